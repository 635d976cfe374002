"""``report.html`` after real predict (S3 to S3) and evaluate runs: it parses, its images decode,
and its numbers are the run's own (``_run.json``, the masks, the evaluation JSON)."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydeeplab import storage
from raydeeplab.batch import run_predict
from raydeeplab.config import PredictConfig
from raydeeplab.data import synthetic
from raydeeplab.data.images import encode_jpeg
from raydeeplab.evaluate import EvaluateConfig, run_evaluate
from raydeeplab.report import write_run_report
from tests.corpus import photo

CLASSES = 5
# Pascal VOC's published colour map, first entries: background, aeroplane, bicycle, bird, boat
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]


class Elements(HTMLParser):
    """Every start tag of a page as ``(tag, attrs)``."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def having(self, attr: str) -> list[dict]:
        return [a for _, a in self.elements if attr in a]

    def by_id(self, name: str) -> dict:
        return next(a for _, a in self.elements if a.get("id") == name)


def images_of(page: Elements) -> list[Image.Image]:
    out = []
    for tag, attrs in page.elements:
        if tag == "img":
            header, data = attrs["src"].split(",", 1)
            assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            image.load()
            out.append(image)
    return out


def test_predict_writes_a_report_whose_numbers_are_the_runs(ray_local, bucket, tiny_model):
    for i in range(7):
        storage.write_bytes(f"{bucket}/in/img_{i}.jpg", encode_jpeg(photo(30 + 9 * i, 60 - 3 * i)))
    storage.write_bytes(f"{bucket}/in/broken.jpg", b"not a jpeg")
    out = f"{bucket}/out"
    cfg = PredictConfig(input=f"{bucket}/in", output=out, model=tiny_model, batch_size=4, decode_batch_size=2)
    run_predict(cfg)

    record = json.loads(storage.read_bytes(f"{out}/_run.json"))
    text = storage.read_bytes(f"{out}/report.html").decode()  # read back from S3, as a user would
    page = Elements(text)
    summary = page.by_id("summary")
    for key in ("inputs", "ok", "failed", "skipped", "images_per_second"):
        assert json.loads(summary[f"data-{key.replace('_', '-')}"]) == record[key], key
    assert (record["ok"], record["failed"]) == (7, 1)
    failures = {a["data-reason"]: int(a["data-count"]) for a in page.having("data-reason")}
    assert failures == record["errors_by_reason"]
    assert "broken.jpg" in text

    pictures = images_of(page)
    # every predictions row has a confidence now: the 6 least confident, then the 1 ok input left
    assert len(pictures) == record["ok"] == 7
    assert all(max(p.size) <= 256 and p.mode == "RGB" for p in pictures)

    masks = [Image.open(io.BytesIO(storage.read_bytes(uri))) for uri in storage.list_files(f"{out}/masks")]
    assert len(masks) == 7
    for mask in masks:  # visible in any viewer: a palette PNG with VOC's colours
        assert mask.mode == "P"
        palette = np.array(mask.getpalette()[: 3 * CLASSES]).reshape(CLASSES, 3)
        assert [tuple(c) for c in palette] == VOC_COLOURS
    counts = sum(np.bincount(np.asarray(m).ravel(), minlength=CLASSES) for m in masks)
    shares = {a["data-class"]: json.loads(a["data-area"]) for a in page.having("data-area")}
    np.testing.assert_allclose([shares[f"class_{i}"] for i in range(CLASSES)], counts / counts.sum())
    done = [int(p["data-rows"]) for p in page.having("data-rows")]  # throughput: one point per part
    parts = storage.list_files(f"{out}/predictions")  # Ray Data decides how many blocks are written
    if len(parts) > 1:
        assert len(done) == len(parts) and done == sorted(done) and done[-1] == 8  # cumulative, each once
    else:
        assert not done and "one output part: nothing to plot over time" in text


def test_lowest_confidence_rows_are_shown_first_when_the_table_has_confidence(tmp_path):
    out = str(tmp_path)
    for i, confidence in enumerate([0.9, 0.2, 0.7, 0.1, 0.8, 0.95, 0.5, 0.3]):
        image = photo(20 + i, 30)
        storage.write_bytes(f"{out}/in/{i}.jpg", encode_jpeg(image))
        mask = Image.fromarray(np.full((20 + i, 30), i % CLASSES, np.uint8), mode="P")
        mask.putpalette(sum(VOC_COLOURS, ()))
        mask.save(f"{out}/{i}.png")
        table = pa.table({"path": [f"{out}/in/{i}.jpg"], "error": [None], "mask_path": [f"{out}/{i}.png"],
                          "class_pixel_counts": [[0] * CLASSES], "confidence": [confidence]})  # fmt: skip
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(f"{out}/predictions/part-{i}.parquet", sink.getvalue())
    storage.write_bytes(f"{out}/_run.json", json.dumps({"model": "m", "ok": 8}).encode())

    page = Elements(storage.read_bytes(write_run_report(out, [f"class_{i}" for i in range(CLASSES)])).decode())
    shown = [a["data-path"].rsplit("/", 1)[-1] for a in page.having("data-path")]
    assert shown[:6] == ["3.jpg", "1.jpg", "7.jpg", "6.jpg", "2.jpg", "4.jpg"]  # ascending confidence
    assert sorted(shown[6:]) == ["0.jpg", "5.jpg"]  # the rest, at random
    assert len(images_of(page)) == 8


def test_a_large_table_with_masks_in_it_is_summed_one_part_at_a_time(tmp_path):
    """``--masks parquet`` puts every mask in the table: 40 parts of 100 rows with 16 KiB masks
    here (64 MiB). The page's numbers match numpy's over the same rows, and the driver's Python
    heap never holds the table (it read all of it, masks included, as Python rows before)."""
    import tracemalloc

    from raydeeplab.report import RunRows

    rng, out, parts = np.random.default_rng(0), str(tmp_path), 40
    counts = rng.integers(0, 1000, (parts, 100, CLASSES))
    confidence = rng.random((parts, 100)).astype(np.float32)
    failed = rng.random((parts, 100)) < 0.1
    for p in range(parts):
        table = pa.table({
            "path": [f"in/{p}_{i}.jpg" for i in range(100)],
            "error": [("corrupt image: x" if i % 2 else "empty file: y") if failed[p, i] else None for i in range(100)],
            "class_pixel_counts": [None if failed[p, i] else counts[p, i].tolist() for i in range(100)],
            "mask_path": [None if failed[p, i] else f"masks/{p}_{i}.png" for i in range(100)],
            "mask_png": [rng.bytes(16 << 10) for _ in range(100)],
            "confidence": [None if failed[p, i] else float(confidence[p, i]) for i in range(100)],
        })  # fmt: skip
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(f"{out}/predictions/part-{p:02d}.parquet", sink.getvalue())

    tracemalloc.start()
    rows = RunRows.read(out, CLASSES)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB of Python objects for a 64 MiB table"
    np.testing.assert_array_equal(rows.class_pixels, counts[~failed].sum(0))
    assert {reason: count for reason, (count, _) in rows.failures.items()} == {
        "corrupt image": int(failed[:, 1::2].sum()), "empty file": int(failed[:, ::2].sum()),
    }  # fmt: skip
    ok_confidence = np.sort(confidence[~failed])
    shown = rows.samples()
    assert [float(r["confidence"]) for r, _ in shown[:6]] == pytest.approx(ok_confidence[:6].tolist())
    assert len(shown) == 12 and all(r["confidence"] > ok_confidence[5] for r, _ in shown[6:])
    assert len(rows.parts) == parts and sum(n for _, n in rows.parts) == parts * 100


def test_evaluate_writes_iou_bars_and_a_confusion_heat_map_matching_the_json(ray_local, tmp_path, tiny_model):
    data, out = str(tmp_path / "voc"), str(tmp_path / "eval")
    synthetic.make_shapes_dataset(data, 8, size=(50, 70), num_classes=CLASSES, layout="voc")
    scores = run_evaluate(EvaluateConfig(data=data, model=tiny_model, batch_size=4, output=out))

    saved = json.loads(storage.read_bytes(f"{out}/eval_val.json"))
    page = Elements(storage.read_bytes(f"{out}/report.html").decode())
    assert [json.loads(a["data-iou"]) for a in page.having("data-iou")] == saved["per_class_iou"]
    assert json.loads(page.by_id("scores")["data-mean-iou"]) == saved["mean_iou"] == scores["mean_iou"]
    matrix = np.zeros((CLASSES, CLASSES), np.int64)
    for cell in page.having("data-count"):
        if "data-truth" in cell:
            matrix[int(cell["data-truth"]), int(cell["data-prediction"])] = int(cell["data-count"])
    assert matrix.sum() == saved["pixels"]
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    for iou, hits, total in zip(saved["per_class_iou"], np.diag(matrix), union):  # IoU from the drawn cells
        assert (iou is None) == (total == 0) and (iou is None or np.isclose(iou, hits / total))
