"""``raydeeplab quickstart``: the whole product offline on local Ray, in minutes on 2 CPU cores.

Makes sample images (real photos shipped inside scikit-image, plus generated scenes and one
deliberately broken file), builds a tiny model, runs ``predict`` over them and draws the gallery.
"""

from __future__ import annotations

import os

import numpy as np

from raydeeplab import storage
from raydeeplab.batch import MASKS_DIR, run_predict
from raydeeplab.config import PredictConfig
from raydeeplab.data.images import decode_image, decode_mask_png, encode_jpeg
from raydeeplab.viz import gallery_png

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def sample_photos() -> list[tuple[str, np.ndarray]]:
    import skimage.data

    return [(name, getattr(skimage.data, name)()) for name in PHOTOS]


def generated_scene(rng: np.random.Generator, height: int = 240, width: int = 320) -> np.ndarray:
    """A noisy background with a few flat-coloured discs and boxes."""
    image = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(rng.integers(1, 4)):
        colour = rng.integers(0, 256, 3)
        cy, cx, r = rng.integers(30, height - 30), rng.integers(30, width - 30), rng.integers(15, 50)
        if rng.random() < 0.5:
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = colour
        else:
            image[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = colour
    return image


def make_sample_images(folder: str, count: int, seed: int = 0) -> list[str]:
    """Write ``count`` JPEGs (photos first) plus one truncated file; returns the image URIs."""
    rng = np.random.default_rng(seed)
    uris = []
    photos = sample_photos()
    for i in range(count):
        if i < len(photos):
            name, image = photos[i]
        else:
            name, image = f"scene_{i:03d}", generated_scene(rng)
        uri = storage.join(folder, "photos" if i < len(photos) else "generated", f"{name}.jpg")
        storage.write_bytes(uri, encode_jpeg(image))
        uris.append(uri)
    broken = encode_jpeg(generated_scene(rng))
    storage.write_bytes(storage.join(folder, "broken", "truncated.jpg"), broken[: len(broken) // 3])
    return uris


def quickstart(output: str, images: int = 24, model: str | None = None) -> str:
    """Run the demo into ``output``; returns the gallery PNG's path."""
    from raydeeplab.model import create_model

    images_dir = storage.join(output, "images")
    if not storage.exists(images_dir):
        make_sample_images(images_dir, images)
    if model is None:
        model = storage.join(output, "model")
        if not storage.exists(storage.join(model, "config.json")):
            create_model("tiny", 21, 128, model)
    predictions = storage.join(output, "predictions")
    summary = run_predict(PredictConfig(input=images_dir, output=predictions, model=model, batch_size=8))
    print(summary.line())
    return write_gallery(images_dir, predictions, storage.join(output, "gallery.png"))


def write_gallery(images_dir: str, predictions: str, path: str, rows: int = 6) -> str:
    from raydeeplab.data.images import IMAGE_EXTENSIONS

    uris = [u for u in storage.list_files(images_dir, IMAGE_EXTENSIONS) if "/broken/" not in u][:rows]
    pictures, masks = [], []
    for uri in uris:
        pictures.append(decode_image(storage.read_bytes(uri)))
        rel = storage.relative_to(uri, images_dir)
        masks.append(decode_mask_png(storage.read_bytes(storage.join(predictions, MASKS_DIR, rel + ".png"))))
    titles = [os.path.basename(u) for u in uris]
    storage.write_bytes(path, gallery_png(pictures, masks, titles=titles))
    return path
