"""``OUT/report.html``: one self-contained page per ``predict`` or ``evaluate`` run, for eyes.

Everything is inline (images as ``data:`` URIs, charts as SVG), so the file reads the same
from a laptop, a bucket browser or an email attachment. Every number it shows is also in a
``data-*`` attribute, so programs (and the tests) can read it back. Core: no Ray, no Keras.

    write_run_report("s3://masks/run1", class_names)      # after predict: reads _run.json, Parquet, masks
    write_eval_report("out", scores, matrix)              # after evaluate: IoU bars, confusion heat map
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import html
import io
import json
import random

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from raydeeplab import storage
from raydeeplab.batch import CLASS_PIXELS, CONFIDENCE, ERROR, MASK_PATH, PATH, PREDICTIONS_DIR, RUN_SUMMARY, reason_of
from raydeeplab.data.images import VOC_PALETTE, ImageError, decode_image, decode_mask_png, encode_jpeg, overlay

REPORT = "report.html"
RANDOM_SAMPLES, LOWEST_SAMPLES = 6, 6
THUMBNAIL = 256  # px, longest side of an embedded overlay: keeps a report a few hundred KB
EXAMPLE_PATHS = 3  # failed inputs listed per reason

STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:260px}
.grid img{max-width:256px;max-height:256px;display:block}figcaption{font-size:11px;word-break:break-all}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #999;vertical-align:middle}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
"""


# ---------------------------------------------------------------- entry points


def write_run_report(output: str, class_names: list[str] | tuple[str, ...]) -> str:
    """After ``predict``: ``OUT/report.html`` from ``_run.json``, the predictions Parquet and a
    sample of masks with their source images. Returns the report's URI."""
    run = json.loads(storage.read_bytes(storage.join(output, RUN_SUMMARY)))
    rows = RunRows.read(output, len(class_names))
    sections = [
        summary_section(run),
        samples_section(rows.samples()),
        class_area_section(rows.class_pixels, list(class_names)),
        failures_section(rows.failures),
        throughput_section(sorted(rows.parts)),
        arguments_section(run),
    ]
    return write_page(output, f"raydeeplab predict: {run['model']}", sections)


def write_eval_report(output: str, scores: dict, matrix: np.ndarray) -> str:
    """After ``evaluate``: per-class IoU bars and the confusion matrix ``[truth, prediction]``
    (pixel counts) as a heat map, beside the scores of the evaluation JSON."""
    names = scores["class_names"]
    head = {k: scores[k] for k in ("model", "split", "protocol", "images", "mean_iou", "pixel_accuracy")}
    sections = [
        f"<h2>Scores</h2>{key_values('scores', head)}",
        "<h2>Per-class IoU</h2>" + bar_chart("iou", names, scores["per_class_iou"], fraction=True),
        "<h2>Confusion matrix (rows: truth, columns: prediction; share of each true class)</h2>"
        + heat_map(np.asarray(matrix), names),
    ]
    return write_page(output, f"raydeeplab evaluate: {scores['model']} on {scores['split']}", sections)


def write_page(output: str, title: str, sections: list[str]) -> str:
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>"
    )
    uri = storage.join(output, REPORT)
    storage.write_bytes(uri, text.encode())
    return uri


# ---------------------------------------------------------------- reading a run


@dataclasses.dataclass
class RunRows:
    """What the page shows of a run's predictions, gathered one Parquet part at a time and only
    the columns it needs: the whole table of a ten-million-image run (with ``--masks parquet``,
    the masks too) does not fit in the driver."""

    class_pixels: np.ndarray  # each class's pixels over the run
    failures: dict[str, list] = dataclasses.field(default_factory=dict)  # reason -> [count, first paths]
    lowest: list = dataclasses.field(default_factory=list)  # heap of (-confidence, -order, row)
    pool: list = dataclasses.field(default_factory=list)  # a seeded reservoir of other ok rows
    parts: list = dataclasses.field(default_factory=list)  # (modified time, rows) per part
    seen: int = 0  # ok rows with a mask file
    offered: int = 0  # of them, rows that were offered to the pool
    draw: random.Random = dataclasses.field(default_factory=lambda: random.Random(0))  # the same run, the same page

    @classmethod
    def read(cls, output: str, num_classes: int) -> "RunRows":
        rows = cls(np.zeros(num_classes, np.int64))
        fs, _ = storage.filesystem(output)
        for uri in storage.list_files(storage.join(output, PREDICTIONS_DIR), (".parquet",)):
            part = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri)))
            table = part.read(columns=[c for c in (PATH, ERROR, MASK_PATH, CLASS_PIXELS, CONFIDENCE) if c in part.schema_arrow.names])
            rows.parts.append((fs.modified(storage.filesystem(uri)[1]).timestamp(), table.num_rows))
            for row in table.to_pylist():
                rows.add(row)
        return rows

    def add(self, row: dict) -> None:
        if row.get(ERROR):
            entry = self.failures.setdefault(reason_of(row[ERROR]), [0, []])
            entry[0] += 1
            if len(entry[1]) < EXAMPLE_PATHS:
                entry[1].append(row[PATH])
            return
        if counts := row.get(CLASS_PIXELS):
            self.class_pixels[: len(counts)] += np.asarray(counts[: len(self.class_pixels)], np.int64)
        if not row.get(MASK_PATH):
            return
        self.seen += 1
        if row.get(CONFIDENCE) is not None:
            heapq.heappush(self.lowest, (-row[CONFIDENCE], -self.seen, row))  # ties: the earlier stays
            if len(self.lowest) <= LOWEST_SAMPLES:
                return
            row = heapq.heappop(self.lowest)[2]  # the most confident of them goes to the pool
        self.offered += 1  # reservoir sampling (Algorithm R) over the rows not among the lowest
        if len(self.pool) < RANDOM_SAMPLES:
            self.pool.append(row)
        elif (slot := self.draw.randrange(self.offered)) < RANDOM_SAMPLES:
            self.pool[slot] = row

    def samples(self) -> list[tuple[dict, str]]:
        """``(row, why)`` to show: the lowest-confidence ok rows, then a few random others."""
        lowest = [row for _, _, row in sorted(self.lowest, reverse=True)]
        return [(r, f"confidence {r[CONFIDENCE]:.3f}") for r in lowest] + [(r, "random") for r in self.pool]


def overlay_thumbnail(image_uri: str, mask_uri: str) -> str | None:
    """A ``data:image/jpeg`` URI of the source with its mask blended over it; None when the
    source or mask can no longer be read (moved, deleted, a failed row)."""
    try:
        image = decode_image(storage.read_bytes(image_uri))
        mask = decode_mask_png(storage.read_bytes(mask_uri))
    except (OSError, ImageError):
        return None
    if mask.shape != image.shape[:2]:
        return None
    picture = Image.fromarray(overlay(image, mask))
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    return data_uri("image/jpeg", encode_jpeg(np.asarray(picture), quality=80))


# ---------------------------------------------------------------- sections


def summary_section(run: dict) -> str:
    keys = ("inputs", "skipped", "ok", "failed", "seconds", "images_per_second", "first_output_seconds")
    return "<h2>Run</h2>" + key_values("summary", {k: run.get(k) for k in keys})


def samples_section(samples: list[tuple[dict, str]]) -> str:
    figures = []
    for row, why in samples:
        src = overlay_thumbnail(row[PATH], row[MASK_PATH])
        if src is None:
            continue
        figures.append(
            f"<figure data-path='{esc(row[PATH])}'><img src='{src}' alt='overlay'>"
            f"<figcaption>{esc(why)}: {esc(row[PATH])}</figcaption></figure>"
        )
    body = "".join(figures) or "<p>no readable sample (no successful rows, or sources moved)</p>"
    return f"<h2>Samples (image with its mask)</h2><div class='grid'>{body}</div>"


def class_area_section(counts: np.ndarray, names: list[str]) -> str:
    """Each class's share of all segmented pixels in the run."""
    total = counts.sum()
    shares = (counts / total).tolist() if total else [0.0] * len(names)
    return "<h2>Class area over the run</h2>" + bar_chart("area", names, shares, fraction=True)


def failures_section(by_reason: dict[str, list]) -> str:
    """``by_reason``: reason -> [count, a few paths]."""
    if not by_reason:
        return "<h2>Failures</h2><p>none</p>"
    rows = "".join(
        f"<tr data-reason='{esc(reason)}' data-count='{count}'><td>{esc(reason)}</td>"
        f"<td>{count}</td><td>{'<br>'.join(esc(p) for p in paths)}</td></tr>"
        for reason, (count, paths) in sorted(by_reason.items(), key=lambda kv: -kv[1][0])
    )
    return f"<h2>Failures</h2><table><tr><th>reason</th><th>inputs</th><th>examples</th></tr>{rows}</table>"


def throughput_section(parts: list[tuple[float, int]]) -> str:
    """Rows committed over time: each Parquet part counts when it was written."""
    if len(parts) < 2:
        return "<h2>Throughput</h2><p>one output part: nothing to plot over time</p>"
    start = parts[0][0]
    points, done = [], 0
    for when, rows in parts:
        done += rows
        points.append((when - start, done))
    return "<h2>Throughput (rows written over time)</h2>" + line_chart(points)


def arguments_section(run: dict) -> str:
    return f"<h2>Model and arguments</h2><pre>{esc(json.dumps(run.get('arguments', {}), indent=2))}</pre>"


# ---------------------------------------------------------------- HTML and SVG pieces


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def key_values(name: str, values: dict) -> str:
    """A table whose element carries each value as ``data-<key>`` (JSON), for programs."""
    attrs = " ".join(f"data-{k.replace('_', '-')}='{esc(json.dumps(v))}'" for k, v in values.items())
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table id='{name}' {attrs}>{rows}</table>"


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def colour(index: int) -> str:
    r, g, b = VOC_PALETTE[index]
    return f"#{r:02x}{g:02x}{b:02x}"


def bar_chart(name: str, labels: list[str], values: list, fraction: bool) -> str:
    """Horizontal bars in class colours; ``None`` (class never seen) is drawn as 'n/a'."""
    width, row = 360, 18
    bars = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = i * row
        text = "n/a" if value is None else (f"{value:.1%}" if fraction else fmt(value))
        length = 0 if value is None else width * max(0.0, min(1.0, value))
        bars.append(
            f"<g data-{name}='{esc(json.dumps(value))}' data-class='{esc(label)}'>"
            f"<text x='150' y='{y + 13}' text-anchor='end'>{esc(label)}</text>"
            f"<rect x='158' y='{y + 2}' width='{length:.1f}' height='{row - 4}' fill='{colour(i)}' stroke='#666'/>"
            f"<text x='{164 + length:.1f}' y='{y + 13}'>{text}</text></g>"
        )
    return (
        f"<svg id='{name}' xmlns='http://www.w3.org/2000/svg' width='{width + 230}' "
        f"height='{row * len(labels)}' font-size='12'>{''.join(bars)}</svg>"
    )


def heat_map(matrix: np.ndarray, labels: list[str]) -> str:
    """Cells shaded by each true class's share; ``data-count`` holds the raw pixel count."""
    cell, left, top = 22, 110, 110
    n = len(labels)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    cells = []
    for t in range(n):
        for p in range(n):
            shade = int(255 * (1 - shares[t, p]))
            cells.append(
                f"<rect class='cell' data-truth='{t}' data-prediction='{p}' data-count='{int(matrix[t, p])}' "
                f"x='{left + p * cell}' y='{top + t * cell}' width='{cell}' height='{cell}' "
                f"fill='rgb({shade},{shade},255)'><title>{esc(labels[t])} as {esc(labels[p])}: "
                f"{int(matrix[t, p])} px ({shares[t, p]:.1%})</title></rect>"
            )
    names = "".join(
        f"<text x='{left - 4}' y='{top + i * cell + 15}' text-anchor='end'>{esc(label)}</text>"
        f"<text transform='translate({left + i * cell + 15},{top - 4}) rotate(-60)'>{esc(label)}</text>"
        for i, label in enumerate(labels)
    )
    size = top + n * cell + 4
    return (
        f"<svg id='confusion' xmlns='http://www.w3.org/2000/svg' width='{left + n * cell + 4}' "
        f"height='{size}' font-size='11'>{names}{''.join(cells)}</svg>"
    )


def line_chart(points: list[tuple[float, int]]) -> str:
    """Cumulative rows against seconds since the first part; the slope is images/s."""
    width, height, pad = 480, 200, 40
    t_max = max(points[-1][0], 1e-9)
    n_max = max(points[-1][1], 1)
    xy = " ".join(
        f"{pad + (width - 2 * pad) * t / t_max:.1f},{height - pad - (height - 2 * pad) * n / n_max:.1f}"
        for t, n in points
    )
    marks = "".join(f"<circle data-seconds='{t:.3f}' data-rows='{n}' r='0'/>" for t, n in points)
    return (
        f"<svg id='throughput' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-size='11'>"
        f"<polyline points='{xy}' fill='none' stroke='#36c' stroke-width='2'/>{marks}"
        f"<text x='{pad}' y='{height - 8}'>0 s</text><text x='{width - pad}' y='{height - 8}' "
        f"text-anchor='end'>{t_max:.1f} s</text><text x='4' y='{pad - 8}'>{n_max} rows</text></svg>"
    )
