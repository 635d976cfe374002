"""Export: the size of each exported format, and the CPU speed of ONNX Runtime and of TensorFlow
(the SavedModel) beside our own ``Segmenter`` (JAX), same batch, same images, same machine.

    python bench/export.py                                          # tiny, 128 px, batch 16
    python bench/export.py --model deeplabv3plus_resnet50 --image-size 512 --batch-size 4

Each runtime gets one untimed call, then runs back to back for ``--seconds`` on uint8 batches
(speed does not depend on the pixels); each uses every core by default. Masks are compared on
the same batch as a check that the three compute the same thing. Not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from common import check_positive, rate, result_line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="architecture or preset (default: tiny)")
    parser.add_argument("--num-classes", type=int, default=21, help="architectures only")
    parser.add_argument("--image-size", type=int, default=128, help="architectures only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per runtime")
    args = parser.parse_args(argv)
    check_positive(parser, args, "num_classes", "image_size", "batch_size")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import onnxruntime
    import tensorflow as tf

    from raydeeplab.export import ONNX_FILE, export_model
    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import Segmenter

    model = load_model(args.model, args.num_classes, args.image_size)
    segmenter = Segmenter(model, args.batch_size)
    size = segmenter.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for fmt in ("onnx", "saved_model"):
            sizes[fmt] = export_model(args.model, fmt, os.path.join(tmp, fmt), None, args.num_classes, args.image_size)["bytes"]
        session = onnxruntime.InferenceSession(os.path.join(tmp, "onnx", ONNX_FILE), providers=["CPUExecutionProvider"])
        serve = tf.saved_model.load(os.path.join(tmp, "saved_model")).signatures["serving_default"]
        runtimes = {
            "ours": lambda: segmenter.predict(images),
            "onnxruntime": lambda: session.run(["masks"], {"images": images})[0],
            "tensorflow": lambda: serve(images=tf.constant(images))["masks"].numpy(),
        }
        ours = runtimes["ours"]()
        speeds, agree = {}, {}
        for name, step in runtimes.items():
            agree[name] = float((step() == ours).mean())
            speeds[name] = rate(step, args.batch_size, args.seconds)
    print(f"{args.model} {size} px, batch {args.batch_size}, {os.cpu_count()} CPUs")
    for fmt, n in sizes.items():
        print(f"  {fmt:12s} {n / 1e6:8.1f} MB")
    for name, speed in speeds.items():
        print(f"  {name:12s} {speed:8.1f} img/s  ({speed / speeds['ours']:.2f} x ours; masks agree on {agree[name]:.4%})")
    print(result_line(ours=speeds["ours"], onnxruntime=speeds["onnxruntime"], tensorflow=speeds["tensorflow"],
                      ratio=speeds["onnxruntime"] / speeds["ours"], onnx_mb=sizes["onnx"] / 1e6,
                      saved_model_mb=sizes["saved_model"] / 1e6))  # fmt: skip


if __name__ == "__main__":
    main()
