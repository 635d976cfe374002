"""``predict --tile`` (issue 11, item 1) and ``--overlays`` (issue 13, item 3) through the CLI as a
subprocess from a temp cwd, against a real S3 server: scenes larger than the model are cut into
tiles that flow through the segmenter actors and come back as one mask, one row per scene.

Reference: the keras-hub model itself (``training=False``) on each tile, softmax and blend in
float64 numpy (as tests/test_tiling.py), nothing of the pipeline's assembly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from raydeeplab import storage
from raydeeplab.batch import CONFIDENCE, ERROR, MASK_PATH, PATH, read_mask
from raydeeplab.data.images import VOC_PALETTE, decode_image, decode_mask_png
from raydeeplab.tiling import TileGrid
from tests.corpus import png
from tests.test_cli import raydeeplab
from tests.test_shards import read_rows
from tests.test_tiling import reference_blend, split_pattern

TILE, OVERLAP, CLASSES = 64, 16, 5  # tiny_model: 64 px, 5 classes


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def tiled_reference(model, scene: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(mask, mean top-class probability, the first tile's own probabilities) of a float64 blend of
    the keras-hub model's softmax on each tile."""
    grid = TileGrid(*scene.shape[:2], TILE, OVERLAP)
    tiles = np.stack([grid.crop(scene, i) for i in range(len(grid))])
    converter = model.preprocessor.image_converter
    x = tiles.astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    logits = np.asarray(model(x, training=False), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mask, top = reference_blend(grid, probs)
    return mask, float(top.mean()), probs[0]


def expected_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Half source, half palette colour where the class is not background (numpy, float64)."""
    colours = VOC_PALETTE[mask].astype(np.float64)
    return np.where(mask[..., None] > 0, 0.5 * image + 0.5 * colours, image)


def test_scenes_become_tiles_on_the_actors_and_one_seamless_mask_per_scene(bucket, tiny_model, tmp_path):
    from raydeeplab.presets import load_model

    stride = TILE - OVERLAP
    model = load_model(tiny_model)
    pattern = split_pattern(lambda p: tiled_reference(model, np.tile(p, (3, 3, 1)))[0], stride)
    scenes = {
        "scenes/a.png": np.tile(pattern, (5, 6, 1))[:230, :270],  # 5 x 6 tiles, the last row and column padded
        "scenes/deep/b.png": np.tile(pattern, (3, 9, 1))[:110, :420],
    }
    for key, scene in scenes.items():
        storage.write_bytes(f"{bucket}/{key}", png(scene))
    storage.write_bytes(f"{bucket}/scenes/junk.png", b"not a png")
    output = f"{bucket}/out"

    run = raydeeplab(
        tmp_path, "predict", "--input", f"{bucket}/scenes", "--output", output, "--model", tiny_model,
        "--tile", str(TILE), "--overlap", str(OVERLAP), "--batch-size", "4", "--decode-batch-size", "8",
        "--masks", "both", "--overlays",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout
    assert "2 ok, 1 failed" in run.stdout, run.stdout

    rows = {r[PATH]: r for r in read_rows(output)}
    assert len(rows) == 3  # one row per scene, not per tile
    assert rows[f"{bucket}/scenes/junk.png"][ERROR].startswith("not an image")
    for key, scene in scenes.items():
        row = rows[f"{bucket}/{key}"]
        assert row[ERROR] is None and (row["height"], row["width"]) == scene.shape[:2]
        mask = read_mask(row)
        np.testing.assert_array_equal(mask, decode_mask_png(storage.read_bytes(row[MASK_PATH])))
        reference, confidence, first = tiled_reference(model, scene)
        assert (mask == reference).mean() > 0.99, key  # near-ties flip: float16 bands, classifier-first rounding
        assert np.sort(np.bincount(reference.ravel()))[-2] > 0.03 * reference.size  # not one flat class
        assert row[CONFIDENCE] == pytest.approx(confidence, abs=1e-3)
        # Whole tiles see the pattern shifted by whole strides: every centre is the pattern's own
        # mask, so a tile placed wrong, or a seam at a tile edge, shows.
        own = np.argmax(first, -1)[OVERLAP : TILE - OVERLAP, OVERLAP : TILE - OVERLAP]
        grid = TileGrid(*scene.shape[:2], TILE, OVERLAP)
        whole = 0
        for index in range(len(grid)):
            y, x = grid.origin(index)
            if y + TILE <= grid.height and x + TILE <= grid.width:
                centre = mask[y + OVERLAP : y + TILE - OVERLAP, x + OVERLAP : x + TILE - OVERLAP]
                assert (centre == own).mean() > 0.99, (key, index)
                whole += 1
        assert whole >= 3
        # seams: the rows and columns where tiles meet agree with the float64 blend as well
        edges = np.zeros(mask.shape, bool)
        for start in range(OVERLAP, max(mask.shape), stride):
            edges[start - 1 : start + 1, :] = True
            edges[:, start - 1 : start + 1] = True
        assert (mask[edges] == reference[edges]).mean() > 0.99, key

        overlay = decode_image(storage.read_bytes(f"{output}/overlays/{key.split('/', 1)[1]}.jpg"))
        assert overlay.shape == scene.shape
        # JPEG's chroma subsampling moves a speckled class's mean colour by up to ~60 levels (measured),
        # so the numpy blend goes through Pillow's JPEG at the same quality before comparing
        expected = decode_image(jpeg(expected_overlay(scene, mask).astype(np.uint8)))
        assert np.abs(overlay.astype(float) - expected).mean() < 1.5, key
        assert (np.abs(overlay.astype(int) - expected) > 24).mean() < 0.001, key

    record = json.loads(storage.read_bytes(f"{output}/_run.json"))
    held, rss = record["assembly_peak_bytes"], record["assembler_peak_rss_bytes"]
    # tiling's bound per open scene (mask + open band cells) + the kept source bytes; both may be open
    bound = sum(s.shape[0] * s.shape[1] + 4 * (s.shape[1] + TILE) * OVERLAP * CLASSES * 4 for s in scenes.values())
    bound += sum(len(png(s)) for s in scenes.values())
    floats = sum(s.shape[0] * s.shape[1] * CLASSES * 4 for s in scenes.values())
    print(
        f"assembly: peak held {held / 2**10:.0f} KiB (bound {bound / 2**10:.0f} KiB; the scenes' float32 "
        f"probabilities would be {floats / 2**10:.0f} KiB); assembler process peak RSS {rss / 2**20:.0f} MiB"
    )
    assert 0 < held <= bound


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tile", "128", "--overlap", "16"], "--tile 128 must equal the model's input size 64"),
        (["--tile", "64"], "--overlap must be >= 0 and < --tile / 2 (32), got 64"),
        (["--tile", "64", "--overlap", "40"], "--overlap must be >= 0 and < --tile / 2 (32), got 40"),
        (["--tile", "64", "--overlap", "16", "--resize", "pad"], "--resize pad does not apply with --tile"),
    ],
)
def test_tile_flags_are_checked_before_ray_starts(tmp_path, tiny_model, capsys, monkeypatch, flags, message):
    import raydeeplab.cli
    from raydeeplab.data.images import encode_jpeg
    from tests.corpus import photo

    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.jpg").write_bytes(encode_jpeg(photo()))
    started = []
    monkeypatch.setattr(raydeeplab.cli, "init_ray", lambda *args: started.append(args))
    argv = ["predict", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", tiny_model]
    assert raydeeplab.cli.main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err
    assert started == [] and not (tmp_path / "out").exists()
