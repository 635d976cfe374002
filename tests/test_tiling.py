"""Tiled inference: the assembled mask equals a float64 numpy blend of per-tile predictions, with
bounded memory, whatever order tiles arrive in."""

import tracemalloc

import numpy as np
import pytest

from raydeeplab.presets import load_model
from raydeeplab.segmenter import LOW_CONFIDENCE, Segmenter
from raydeeplab.tiling import SceneAssembler, TileGrid, band_pieces, blend_window


def reference_blend(grid: TileGrid, probs: np.ndarray) -> np.ndarray:
    """float64 ``sum_t w_t p_t`` over the padded canvas -> argmax cut to the image."""
    window = blend_window(grid.tile, grid.overlap).astype(np.float64)[..., None]
    canvas = np.zeros((grid.rows * grid.stride + grid.overlap, grid.cols * grid.stride + grid.overlap, probs.shape[-1]))
    for index, p in enumerate(probs):
        y, x = grid.origin(index)
        canvas[y : y + grid.tile, x : x + grid.tile] += window * p
    blended = canvas[: grid.height, : grid.width]
    top = blended.max(-1) / blended.sum(-1)
    return np.argmax(blended, -1), top


def tile_outputs(grid: TileGrid, p: np.ndarray, index: int):
    """What the device returns for one tile, computed in numpy from its probabilities."""
    weighted = p * blend_window(grid.tile, grid.overlap)[..., None]
    bands = np.concatenate([weighted[rows, cols].reshape(-1, p.shape[-1]) for rows, cols in band_pieces(grid.tile, grid.overlap)])
    y0, y1, x0, x1 = grid.centre_box(index)
    top = p.max(-1)[y0:y1, x0:x1]
    return np.argmax(p, -1).astype(np.uint8), bands.astype(np.float16), top.sum(), (top < LOW_CONFIDENCE).sum()


@pytest.mark.parametrize(
    "shape, overlap", [((150, 230), 12), ((40, 41), 12), ((64, 64), 12), ((200, 97), 12), ((150, 230), 0), ((64, 64), 0)]
)
def test_any_arrival_order_gives_the_float64_blend(shape, overlap):
    grid = TileGrid(*shape, tile=64, overlap=overlap)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(grid), 64, 64, 4)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    reference, top = reference_blend(grid, probs)
    assembler = SceneAssembler(grid, 4, LOW_CONFIDENCE)
    for index in rng.permutation(len(grid)):
        assert not assembler.done
        assembler.add(index, *tile_outputs(grid, probs[index], index))
    assert assembler.done and not assembler.open
    # float16 band values: a pixel whose two best classes are within ~1e-3 may flip
    assert (assembler.mask == reference).mean() > 0.999
    confidence, low = assembler.confidence()
    assert confidence == pytest.approx(top.mean(), abs=1e-3)
    assert low == pytest.approx((top < LOW_CONFIDENCE).mean(), abs=2e-3)


def test_assembly_memory_is_linear_in_the_width_not_the_area():
    """A 6,000 x 6,000 scene, 512 tiles, overlap 64, 21 classes, raster order: float32 logits of the
    scene would be 3 GB; the peak stays near the mask (36 MB) plus one row of open band cells."""
    height = width = 6000
    tile, overlap, classes = 512, 64, 21
    grid = TileGrid(height, width, tile, overlap)
    centre = np.zeros((tile, tile), np.uint8)
    bands = np.full((tile * tile - (tile - 2 * overlap) ** 2, classes), 1 / classes, np.float16)
    assembler = SceneAssembler(grid, classes, LOW_CONFIDENCE)
    tracemalloc.start()
    peak_open = 0
    for index in range(len(grid)):
        assembler.add(index, centre, bands, 0.0, 0)
        peak_open = max(peak_open, assembler.open_bytes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bound = height * width + (width + 2 * tile) * overlap * classes * 4
    print(f"assembly peak {peak / 2**20:.1f} MiB (open cells {peak_open / 2**20:.1f} MiB), bound {bound / 2**20:.1f} MiB")
    assert assembler.done and peak_open <= (width + 2 * tile) * overlap * classes * 4
    assert peak <= bound + 16 * 2**20  # + one tile's temporaries
    assert peak < height * width * classes * 4 / 50


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(load_model(tiny_model), batch_size=4)


def split_pattern(mask_of, side: int) -> np.ndarray:
    """A ``side`` x ``side`` pattern on which ``mask_of(pattern)`` (a class map) has a second class
    over 10% of its pixels: the tiny model is random, and where it predicts one class everywhere a
    misplaced or seamed tile would not show. Coarse colour blocks with noise on top: over 8 random
    models, plain noise found none for 2 of them in 50 tries, these found one for all 8."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        blocks = int(rng.integers(2, 6))
        coarse = np.repeat(np.repeat(rng.integers(0, 256, (blocks, blocks, 3)), -(-side // blocks), 0), -(-side // blocks), 1)
        pattern = np.clip(coarse[:side, :side] + rng.integers(-40, 41, (side, side, 3)), 0, 255).astype(np.uint8)
        mask = mask_of(pattern)
        if np.sort(np.bincount(mask.ravel()))[-2:][0] > 0.1 * mask.size:
            return pattern
    pytest.fail("none of 100 patterns gives the tiny model two classes")


@pytest.mark.parametrize("overlap", [16, 0])
def test_a_scene_made_of_a_repeated_pattern_matches_per_tile_inference_without_seams(segmenter, overlap):
    """Reference: the keras-hub model itself (``training=False``) on each tile, softmax and blend in
    float64 numpy. The scene repeats one tile-sized pattern, so every tile centre must also equal
    the pattern's own mask: a misplaced or seamed tile shows."""
    size = segmenter.image_size
    pattern = split_pattern(lambda p: segmenter.predict(np.tile(p, (2, 2, 1))[None, :size, :size]), size - overlap)
    scene = np.tile(pattern, (4, 5, 1))[:170, :230]
    grid = TileGrid(*scene.shape[:2], size, overlap)
    tiles = np.stack([grid.crop(scene, i) for i in range(len(grid))])
    boxes = np.array([grid.centre_box(i) for i in range(len(grid))], np.int32)
    out = segmenter.segment_tiles(tiles, boxes, overlap)
    assembler = SceneAssembler(grid, segmenter.num_classes, LOW_CONFIDENCE)
    for index in range(len(grid))[::-1]:
        assembler.add(index, out.masks[index], out.bands[index], out.top_sum[index], out.low_count[index])

    converter = segmenter.model.preprocessor.image_converter
    x = tiles.astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    logits = np.asarray(segmenter.model(x, training=False), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    reference, top = reference_blend(grid, probs)
    assert (assembler.mask == reference).mean() > 0.999
    assert np.sort(np.bincount(reference.ravel()))[-2] > 0.05 * reference.size  # not one flat class
    assert assembler.confidence()[0] == pytest.approx(top.mean(), abs=1e-3)
    stride = size - overlap
    own = np.argmax(probs[0], -1)[overlap : size - overlap, overlap : size - overlap]
    for index in range(len(grid)):
        y, x = grid.origin(index)
        if y + size <= grid.height and x + size <= grid.width:  # unpadded tiles see the pattern shifted by whole strides
            assert y % stride == 0 and x % stride == 0
            centre = assembler.mask[y + overlap : y + size - overlap, x + overlap : x + size - overlap]
            assert (centre == own).mean() > 0.999


def test_tiles_of_scenes_sharing_an_id_meet_their_own_scene_in_any_interleaving():
    """Two different scenes under one id (an id repeated across shards) and one scene listed twice:
    tiles arrive interleaved, as from parallel decoding tasks. Each tile joins its own scene (by the
    scene's bytes), and a repeated scene is two assemblies; before, the tiles met under the id."""
    from raydeeplab.batch import BANDS, ERROR, HEIGHT, LOW_COUNT, MASK, PATH, RELPATH, SCENE, SCENE_MASK, TILE, TOP_SUM, WIDTH
    from raydeeplab.batch import MaskAssembler

    grid, rng = TileGrid(150, 230, tile=64, overlap=12), np.random.default_rng(1)
    scenes = {}
    for key in ("a", "b"):
        logits = rng.normal(size=(len(grid), 64, 64, 4)) * 3
        scenes[key] = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    arrivals = [(key, i) for key in ("a", "b", "a") for i in range(len(grid))]  # "a" twice
    order = rng.permutation(len(arrivals))
    rows = []
    for key, index in (arrivals[j] for j in order):
        mask, bands, top_sum, low_count = tile_outputs(grid, scenes[key][index], index)
        rows.append({PATH: "id-0", RELPATH: "id-0", SCENE: key, TILE: index, HEIGHT: 150, WIDTH: 230, ERROR: "",
                     MASK: mask, BANDS: bands, TOP_SUM: top_sum, LOW_COUNT: low_count})  # fmt: skip
    assembler, done = MaskAssembler(64, 12, 4, LOW_CONFIDENCE, keep_bytes=False), []
    for start in range(0, len(rows), 5):
        batch = {column: np.array([r[column] for r in rows[start : start + 5]]) for column in rows[0]}
        for out in assembler(batch):
            done += [np.frombuffer(m, np.uint8).reshape(150, 230) for m in out[SCENE_MASK]]
    assert len(done) == 3 and not assembler.scenes
    expected = {key: reference_blend(grid, probs)[0] for key, probs in scenes.items()}
    matches = sorted(min(("a", "b"), key=lambda k: (mask != expected[k]).mean()) for mask in done)
    assert matches == ["a", "a", "b"]
    for mask in done:
        assert max((mask == reference).mean() for reference in expected.values()) > 0.999


def test_low_confidence_counts_sent_as_float32_products_are_rounded_not_truncated():
    """The device sends a tile's count as ``(count / area) * area`` in float32: 7 of 3,000 pixels
    arrives as 6.9999995, and was counted as 6."""
    grid = TileGrid(50, 60, tile=64, overlap=0)  # one tile, its centre the whole 50 x 60 image
    area = np.float32(50 * 60)
    sent = np.float32(np.float32(7) / area) * area
    assert sent < 7
    assembler = SceneAssembler(grid, 4, LOW_CONFIDENCE)
    assembler.add(0, np.zeros((64, 64), np.uint8), np.zeros((0, 4), np.float16), np.float32(2000.0), sent)
    assert assembler.done and assembler.confidence()[1] == 7 / 3000
