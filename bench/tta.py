"""Test-time augmentation: mean IoU and device cost of each ``--tta`` setting, one run.

    raydeeplab quickstart                                   # writes quickstart_out/ (data + trained model)
    python bench/tta.py --model quickstart_out/run/best --data quickstart_out/data --extra 192

Scores quickstart's held-out split (and, with ``--extra N``, N more synthetic examples of the same
kind drawn with another seed: quickstart holds out only 12) with the same ``Segmenter`` the batch
actors and Serve replicas run, the VOC protocol (label 255 ignored, scored at the source size),
per setting; then times ``Segmenter.segment`` on one batch already in host memory. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from raydeeplab.data import synthetic, voc
from raydeeplab.data.examples import load_example
from raydeeplab.data.images import fit_image, restore_mask
from raydeeplab.metrics import ConfusionMatrix
from raydeeplab.presets import input_size, load_model
from raydeeplab.segmenter import Segmenter
from raydeeplab.tta import TestTimeAugmentation

SETTINGS = ("none", "flip", "scales={}", "flip,scales={}")  # scales: see main()


def held_out(data: str, extra: int, num_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = voc.split_pairs(data, "voc", "val")
    if extra:
        root = tempfile.mkdtemp(prefix="raydeeplab-tta-")
        n = extra * synthetic.VAL_EVERY  # every VAL_EVERY-th example is held out
        synthetic.make_shapes_dataset(root, n, size=(96, 128), num_classes=num_classes, photos=True, seed=1)
        pairs += voc.split_pairs(root, "voc", "val")
    return [load_example(p[voc.IMAGE_URI], p[voc.MASK_URI]) for p in pairs]


def score(segmenter: Segmenter, examples) -> float:
    fitted = [fit_image(image, segmenter.image_size, "stretch") for image, _ in examples]
    masks = segmenter.predict(np.stack([model_input for model_input, _ in fitted]))
    matrix = ConfusionMatrix(segmenter.num_classes)
    for mask, (_, box), (_, truth) in zip(masks, fitted, examples):
        matrix.update(truth, restore_mask(mask, box, *truth.shape))
    return matrix.compute()["mean_iou"]


def images_per_second(segmenter: Segmenter, seconds: float) -> float:
    batch = np.random.default_rng(0).integers(0, 256, (segmenter.batch_size, *(segmenter.image_size,) * 2, 3), np.uint8)
    segmenter.segment(batch)  # compile
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        segmenter.segment(batch)
        calls += 1
    return calls * segmenter.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="preset folder (quickstart_out/run/best)")
    parser.add_argument("--data", required=True, help="VOC-layout folder (quickstart_out/data)")
    parser.add_argument("--extra", type=int, default=0, help="more held-out synthetic examples (other seed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each setting is timed")
    args = parser.parse_args()
    model = load_model(args.model)
    examples = held_out(args.data, args.extra, model.num_classes)
    print(f"{len(examples)} held-out examples; model {args.model}; batch {args.batch_size}")
    print(f"{'--tta':28s} {'views':>5s} {'mean IoU':>9s} {'img/s':>8s} {'cost':>6s}")
    base = None
    # the usual 0.75,1,1.25 at 512 px; a 64 px model's inputs are multiples of 32: 32, 64, 96
    scales = "0.75,1,1.25" if input_size(model) >= 256 else "0.5,1,1.5"
    for setting in (s.format(scales) for s in SETTINGS):
        tta = TestTimeAugmentation.parse(setting)
        segmenter = Segmenter(model, args.batch_size, tta)
        miou, rate = score(segmenter, examples), images_per_second(segmenter, args.seconds)
        base = base or rate
        print(f"{setting:28s} {tta.passes:5d} {miou:9.4f} {rate:8.1f} {base / rate:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
