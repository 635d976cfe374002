"""Real image files of every kind a collection contains, good and bad, with what must happen to each."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from raydeeplab import storage


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def png(image: np.ndarray) -> bytes:
    """Lossless: what a pipeline decodes is exactly ``image``."""
    return encoded(Image.fromarray(image), "PNG")


def photo(height: int = 40, width: int = 60) -> np.ndarray:
    """Smooth, asymmetric gradients: JPEG keeps them, and any flip or rotation shows."""
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx + 2 * yy) % 256], -1).astype(np.uint8)


def exif_rotated_jpeg() -> bytes:
    """Stored 60 wide x 40 high, tagged 'rotate 90': it must decode 40 wide x 60 high."""
    image = Image.fromarray(photo(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encoded(image, "JPEG", exif=exif.tobytes())


def corpus() -> dict[str, tuple[bytes, tuple[int, int] | str]]:
    """name -> (bytes, expected (height, width) when it decodes, or the error's reason prefix)."""
    rgb = Image.fromarray(photo())
    good_jpeg = encoded(rgb, "JPEG")
    big_jpeg = encoded(Image.fromarray(photo(200, 300)), "JPEG")  # header intact after the cut
    gray16 = Image.fromarray((np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27))
    return {
        "ok.jpg": (good_jpeg, (40, 60)),
        "gray.png": (encoded(rgb.convert("L"), "PNG"), (40, 60)),
        "rgba.png": (encoded(rgb.convert("RGBA"), "PNG"), (40, 60)),
        "palette.gif": (encoded(rgb.convert("P"), "GIF"), (40, 60)),
        "cmyk.jpg": (encoded(rgb.convert("CMYK"), "JPEG"), (40, 60)),
        "gray16.png": (encoded(gray16, "PNG"), (40, 60)),
        "rotated.jpg": (exif_rotated_jpeg(), (60, 40)),
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (big_jpeg[: len(big_jpeg) // 2], "corrupt image"),
        "not_an_image.png": (b"this is a text file, not a picture\n" * 10, "not an image"),
        "bomb.png": (encoded(Image.new("L", (5000, 5000)), "PNG"), "too many pixels"),
    }


BOMB_LIMIT = 10_000_000  # max_pixels the tests use: bomb.png (25 MP) is over it, the rest far under


def write_corpus(folder: str) -> dict[str, tuple[int, int] | str]:
    """Write every corpus file under ``folder`` (local or s3://); returns name -> expectation."""
    expectations = {}
    for name, (data, expected) in corpus().items():
        storage.write_bytes(storage.join(folder, name), data)
        expectations[name] = expected
    return expectations
