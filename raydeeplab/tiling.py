"""Sliding-window inference for images larger than the model: a tile grid with overlap, the blend
window, and the assembly of a mask at source resolution from tiles that arrive in any order.

Geometry (one axis; ``S`` = tile, ``v`` = overlap, stride ``S - v``, ``v < S / 2``): tile ``r``
starts at ``r * (S - v)``; the last one may run past the image and is padded with the mean
pixel (so every overlap is exactly ``v`` wide). Each tile splits into three segments,
``[0, v)`` shared with tile ``r - 1``, ``[v, S - v)`` its own, ``[S - v, S)`` shared with
``r + 1``. In 2D that makes 9 cells per tile: the centre cell is covered by this tile alone,
the 8 band cells by 1, 2 or 4 tiles.

Blending: the mask at a pixel is ``argmax_c sum_t w_t * p_t[c]`` over the tiles covering it,
``w`` a separable linear ramp across the overlap (1 in the centre cell, > 0 everywhere), so
neighbouring predictions cross-fade and no seam remains. A tile therefore travels as its
centre's class map (uint8) plus ``w * p`` for its band cells only (float16, :func:`band_pieces`).

Memory of :class:`SceneAssembler`: the uint8 mask (``H * W`` bytes) plus a float32 accumulator
for each *open* band cell (one that some but not all of its tiles have reached). Tiles arriving
in raster order keep about one row of boundary cells open, so the peak is
``H*W + 4 * (W + S) * v * C * 4`` bytes: linear in the width, never ``H * W * C`` floats.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from raydeeplab.data.images import MEAN_PIXEL


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiles of one ``height x width`` image, numbered in raster order."""

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self):
        check_tiling(self.tile, self.overlap)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image must be at least 1x1, got {self.height}x{self.width}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def rows(self) -> int:
        return tiles_along(self.height, self.tile, self.overlap)

    @property
    def cols(self) -> int:
        return tiles_along(self.width, self.tile, self.overlap)

    def __len__(self) -> int:
        return self.rows * self.cols

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left pixel of tile ``index`` in the image."""
        row, col = divmod(index, self.cols)
        return row * self.stride, col * self.stride

    def crop(self, image: np.ndarray, index: int) -> np.ndarray:
        """Tile ``index`` of ``image (H, W, 3) uint8`` as ``(S, S, 3) uint8``, mean-padded past the edge."""
        y, x = self.origin(index)
        piece = image[y : y + self.tile, x : x + self.tile]
        if piece.shape[:2] == (self.tile, self.tile):
            return piece
        out = np.full((self.tile, self.tile, 3), MEAN_PIXEL, np.uint8)
        out[: piece.shape[0], : piece.shape[1]] = piece
        return out

    def centre_box(self, index: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` in tile coordinates: the centre cell cut to the image (may be empty)."""
        y, x = self.origin(index)
        low, high = self.overlap, self.tile - self.overlap
        return (low, max(low, min(high, self.height - y)), low, max(low, min(high, self.width - x)))


def check_tiling(tile: int, overlap: int) -> None:
    if tile < 1:
        raise ValueError(f"--tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile / 2:
        raise ValueError(f"--overlap must be >= 0 and < --tile / 2 ({tile / 2:g}), got {overlap}")


def tiles_along(n: int, tile: int, overlap: int) -> int:
    """Tiles that cover ``n`` pixels with stride ``tile - overlap`` (the last one may stick out)."""
    return max(1, math.ceil((n - overlap) / (tile - overlap)))


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """``(S, S) float32`` weight: a linear ramp from ~0 to 1 across each overlap band, 1 inside."""
    check_tiling(tile, overlap)
    centres = np.arange(tile) + 0.5
    ramp = np.minimum(1.0, np.minimum(centres, tile - centres) / max(overlap, 1)) if overlap else np.ones(tile)
    return np.outer(ramp, ramp).astype(np.float32)


def band_pieces(tile: int, overlap: int) -> tuple[tuple[slice, slice], ...]:
    """Where a tile's band cells lie, as ``(rows, cols)`` slices: top, bottom, left, right strips.

    The device packs ``w * p`` of these, flattened and concatenated, into ``(band_pixels, C)``;
    :meth:`SceneAssembler.add` unpacks with the same slices.
    """
    low, high = overlap, tile - overlap
    everything = slice(0, tile)
    return (
        (slice(0, low), everything),
        (slice(high, tile), everything),
        (slice(low, high), slice(0, low)),
        (slice(low, high), slice(high, tile)),
    )


def band_pixels(tile: int, overlap: int) -> int:
    return tile * tile - (tile - 2 * overlap) ** 2


class SceneAssembler:
    """Builds one image's ``(H, W) uint8`` mask from its tiles, in any order; also its confidence.

    ``add`` takes, per tile: the centre's class map, the blended band pieces, and the sum and
    low-confidence count of the top-class probability over :meth:`TileGrid.centre_box`.
    """

    def __init__(self, grid: TileGrid, num_classes: int, low_threshold: float):
        self.grid = grid
        self.num_classes = num_classes
        self.low_threshold = low_threshold
        self.mask = np.zeros((grid.height, grid.width), np.uint8)
        self.open: dict[tuple[int, int], list] = {}  # (segment y, segment x) -> [sum of w*p, tiles seen]
        self.seen: set[int] = set()
        self.confidence_sum = 0.0
        self.low_pixels = 0

    @property
    def done(self) -> bool:
        return len(self.seen) == len(self.grid)

    @property
    def open_bytes(self) -> int:
        return sum(acc.nbytes for acc, _ in self.open.values())

    def confidence(self) -> tuple[float, float]:
        """``(mean top-class probability, fraction below the threshold)`` over the image."""
        pixels = self.grid.height * self.grid.width
        return self.confidence_sum / pixels, self.low_pixels / pixels

    def add(self, index: int, centre: np.ndarray, bands: np.ndarray, top_sum: float, low_count: int) -> None:
        """``centre (S, S) uint8`` (only its centre cell is read), ``bands (band_pixels, C)``."""
        if index in self.seen or not 0 <= index < len(self.grid):
            raise ValueError(f"tile {index} of {len(self.grid)} is out of range or was added twice")
        self.seen.add(index)
        self.confidence_sum += float(top_sum)
        self.low_pixels += round(float(low_count))  # the device sends (count / area) * area in float32
        grid, (row, col) = self.grid, divmod(index, self.grid.cols)
        low, high, size = grid.overlap, grid.tile - grid.overlap, grid.tile
        local = (slice(0, low), slice(low, high), slice(high, size))
        pieces, start = [], 0
        for rows, cols in band_pieces(size, low):
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            pieces.append(bands[start : start + shape[0] * shape[1]].reshape(*shape, bands.shape[-1]))
            start += shape[0] * shape[1]
        top, bottom, left, right = pieces
        for ly in range(3):
            for lx in range(3):
                if ly == 1 and lx == 1:
                    self.place(2 * row + 1, 2 * col + 1, centre[local[1], local[1]])
                    continue
                cell = top if ly == 0 else bottom if ly == 2 else (left if lx == 0 else right)
                cell = cell[:, local[lx]] if ly != 1 else cell
                self.blend(2 * row + ly, 2 * col + lx, cell)

    def blend(self, sy: int, sx: int, cell: np.ndarray) -> None:
        """Adds one tile's ``w * p`` to a band cell; the cell's argmax is taken once all its tiles are in."""
        if cell.size == 0 or self.bounds(sy, sx) is None:
            return
        covering = coverage(sy, self.grid.rows) * coverage(sx, self.grid.cols)
        entry = self.open.get((sy, sx))
        if entry is None:
            entry = self.open[(sy, sx)] = [np.zeros(cell.shape, np.float32), 0]
        entry[0] += cell
        entry[1] += 1
        if entry[1] == covering:
            total = self.open.pop((sy, sx))[0]
            self.place(sy, sx, np.argmax(total, axis=-1).astype(np.uint8))
            self.count_confidence(sy, sx, total)

    def count_confidence(self, sy: int, sx: int, total: np.ndarray) -> None:
        """Band cells' confidence from the blend itself: ``sum_c w*p = w``, so ``max / sum`` is the
        blended top-class probability."""
        (y0, y1), (x0, x1) = self.bounds(sy, sx)
        total = total[: y1 - y0, : x1 - x0]
        top = total.max(axis=-1) / np.maximum(total.sum(axis=-1), np.finfo(np.float32).tiny)
        self.confidence_sum += float(top.sum(dtype=np.float64))
        self.low_pixels += int((top < self.low_threshold).sum())

    def place(self, sy: int, sx: int, classes: np.ndarray) -> None:
        bounds = self.bounds(sy, sx)
        if bounds is None:
            return
        (y0, y1), (x0, x1) = bounds
        self.mask[y0:y1, x0:x1] = classes[: y1 - y0, : x1 - x0]

    def bounds(self, sy: int, sx: int):
        """Image rows and cols of cell ``(sy, sx)``, cut to the image; None when all padding."""
        (y0, y1), (x0, x1) = (segment(s, self.grid) for s in (sy, sx))
        y1, x1 = min(y1, self.grid.height), min(x1, self.grid.width)
        return ((y0, y1), (x0, x1)) if y1 > y0 and x1 > x0 else None


def segment(index: int, grid: TileGrid) -> tuple[int, int]:
    """Pixel range of segment ``index`` along an axis: even = overlap ``k`` (between tiles
    ``k - 1`` and ``k``), odd = centre of tile ``(index - 1) // 2``."""
    tile, start = divmod(index, 2)
    origin = tile * grid.stride
    return (origin, origin + grid.overlap) if start == 0 else (origin + grid.overlap, origin + grid.tile - grid.overlap)


def coverage(index: int, tiles: int) -> int:
    """Tiles covering segment ``index`` of an axis with ``tiles`` tiles."""
    if index % 2:
        return 1
    boundary = index // 2
    return int(boundary > 0) + int(boundary < tiles)
