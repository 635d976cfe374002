"""Small synthetic segmentation sets in the real on-disk layouts (VOC, SBD, generic).

Tests and the quickstart need data that is real files (JPEG, palette PNG, ``.mat``) in
the layouts the readers expect, written locally or to ``s3://``, without a download.
Each image is a textured (or photo) background with filled circles and rectangles;
class ``k`` always has the same saturated colour, so a tiny model learns it in minutes.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
import scipy.io
from PIL import Image, ImageDraw
from scipy import ndimage, sparse

from raydeeplab import storage
from raydeeplab.data.images import IGNORE_LABEL, encode_jpeg, encode_mask_png
from raydeeplab.data.voc import LAYOUTS

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # ship inside scikit-image: no download
VAL_EVERY = 4  # every 4th image goes to val


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3) uint8``: evenly spaced saturated hues; row 0 (background) unused."""
    hues = np.arange(num_classes - 1) / max(num_classes - 1, 1)
    colours = [(0, 0, 0)] + [colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def image_id(index: int) -> str:
    return f"img_{index:06d}"


def is_val(index: int) -> bool:
    return index % VAL_EVERY == VAL_EVERY - 1


def background(
    rng: np.random.Generator, height: int, width: int, photos: list | None
) -> np.ndarray:
    """``(H, W, 3) uint8``: a random crop of a photo, or low-saturation blotchy noise."""
    if photos:
        photo = photos[rng.integers(len(photos))]
        scale = max(height / photo.shape[0], width / photo.shape[1]) * rng.uniform(1.0, 1.5)
        size = (int(np.ceil(photo.shape[1] * scale)), int(np.ceil(photo.shape[0] * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))
        top = rng.integers(photo.shape[0] - height + 1)
        left = rng.integers(photo.shape[1] - width + 1)
        return photo[top : top + height, left : left + width].copy()
    coarse = rng.uniform(60, 180, size=(height // 8 + 1, width // 8 + 1, 1))
    blotches = np.asarray(
        Image.fromarray(coarse[..., 0].astype(np.uint8)).resize((width, height), Image.BILINEAR),
        np.float32,
    )
    tint = rng.uniform(-15, 15, size=3)  # a little colour, far from the class hues
    noise = rng.normal(0, 12, size=(height, width, 3))
    return np.clip(blotches[..., None] + tint + noise, 0, 255).astype(np.uint8)


def draw_example(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int,
    photos: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(H, W, 3) uint8`` image and its ``(H, W) uint8`` mask with 1-3 objects."""
    image = Image.fromarray(background(rng, height, width, photos))
    mask = Image.new("L", (width, height), 0)
    colours = class_colours(num_classes)
    paint, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 4)):
        k = int(rng.integers(1, num_classes))
        r = rng.uniform(0.12, 0.3) * min(height, width)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        box = [cx - r, cy - r * rng.uniform(0.6, 1.0), cx + r, cy + r * rng.uniform(0.6, 1.0)]
        shade = np.clip(colours[k].astype(int) + rng.integers(-20, 21, 3), 0, 255)
        draw = "ellipse" if rng.random() < 0.5 else "rectangle"
        getattr(paint, draw)(box, fill=tuple(int(c) for c in shade))
        getattr(label, draw)(box, fill=k)
    return np.asarray(image), np.asarray(mask)


def mark_borders(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask`` with ``width`` pixels each side of every class edge set to 255, as VOC does."""
    window = 2 * width + 1
    edge = ndimage.maximum_filter(mask, window) != ndimage.minimum_filter(mask, window)
    return np.where(edge, np.uint8(IGNORE_LABEL), mask)


def encode_mat(mask: np.ndarray) -> bytes:
    """SBD's ``.mat``: struct ``GTcls`` with Segmentation (class map), CategoriesPresent and
    Boundaries (a cell of sparse edge maps, one per present class)."""
    present = np.unique(mask[(mask > 0) & (mask != IGNORE_LABEL)])
    boundaries = np.empty((len(present), 1), dtype=object)
    for row, k in enumerate(present):
        region = mask == k
        boundaries[row, 0] = sparse.csc_matrix(region & ~ndimage.binary_erosion(region))
    out = io.BytesIO()
    gtcls = {
        "Segmentation": mask.astype(np.uint8),
        "Boundaries": boundaries,
        "CategoriesPresent": present.astype(np.uint8).reshape(-1, 1),
    }
    scipy.io.savemat(out, {"GTcls": gtcls})
    return out.getvalue()


def load_photos(names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    import skimage.data  # only when asked for: importing scikit-image costs a second

    return [getattr(skimage.data, name)()[..., :3] for name in names]


def make_shapes_dataset(
    root: str,
    n: int,
    size: tuple[int, int] = (96, 128),
    num_classes: int = 4,
    layout: str = "voc",
    seed: int = 0,
    photos: bool = False,
    first_index: int = 0,
) -> dict[str, list[str]]:
    """Write ``n`` examples below ``root`` (local or ``s3://``); returns the ids per split,
    ``{"train": [...], "val": [...]}`` (every ``VAL_EVERY``-th example is val).

    Layouts, as the readers in :mod:`raydeeplab.data.voc` expect them:

    - ``voc``: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (255 borders),
      ImageSets/Segmentation/{train,val,trainval}.txt
    - ``sbd``: dataset/img/<id>.jpg, dataset/cls/<id>.mat, dataset/{train,val}.txt
    - ``generic``: images/<id>.jpg, masks/<id>.png (train and val both there)

    Example ``i`` has id ``img_{i:06d}`` for ``i`` from ``first_index`` and the same pixels
    in every layout (seeded by ``(seed, i)``), so VOC and SBD sets can share ids like the
    real ones do. ``size`` is ``(height, width)``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 2 <= num_classes <= IGNORE_LABEL:
        raise ValueError(f"num_classes must be in [2, {IGNORE_LABEL}], got {num_classes}")
    image_file, mask_file, split_file = LAYOUTS[layout]
    backgrounds = load_photos() if photos else None
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for index in range(first_index, first_index + n):
        rng = np.random.default_rng([seed, index])  # the same example in every layout
        image, mask = draw_example(rng, *size, num_classes, backgrounds)
        if layout == "voc":  # the SBD copy has the same pixels; only VOC marks borders
            mask = mark_borders(mask, 2)
        name = image_id(index)
        write(root, image_file.format(name), encode_jpeg(image))
        mask_bytes = encode_mat(mask) if layout == "sbd" else encode_mask_png(mask)
        write(root, mask_file.format(name), mask_bytes)
        splits["val" if is_val(index) else "train"].append(name)
    if split_file:
        lists = dict(splits)
        if layout == "voc":
            lists["trainval"] = sorted(splits["train"] + splits["val"])
        for split, ids in lists.items():
            write(root, split_file.format(split), "".join(f"{i}\n" for i in ids).encode())
    return splits


def write(root: str, relative: str, data: bytes) -> None:
    storage.write_bytes(storage.join(root, *relative.split("/")), data)
