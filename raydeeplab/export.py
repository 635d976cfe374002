"""``raydeeplab model export``: a model as files that need nothing of ours to run: a TensorFlow
SavedModel or an ONNX model of the graph the batch actors run (uint8 images in; normalisation,
forward pass, softmax and argmax inside; class map and confidence out).

The route, the one of three tried whose output ONNX Runtime loads and whose masks match:

1. Keras' TensorFlow backend, in a child process (this one runs JAX), loads the preset and
   writes :func:`build_export_model` with ``model.export(format="tf_saved_model")``, the batch
   dimension dynamic unless ``--batch-size`` fixes it;
2. ``--format onnx``: tf2onnx's SavedModel converter turns that SavedModel into ONNX (opset 17).

Not taken: Keras' ``format="onnx"`` on JAX (jax2onnx needs a fixed batch, and its graph held a
``BitCast``, an op ONNX Runtime lacks) and on TensorFlow (tf2onnx's ``from_function`` makes the
constants a functional model captures extra graph inputs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import typing

from raydeeplab import storage
from raydeeplab.cluster import verbose
from raydeeplab.config import ExportFormat
from raydeeplab.errors import UserError

FORMATS = typing.get_args(ExportFormat)
ONNX_FILE = "model.onnx"  # --format onnx: the one file under --output
OPSET = 17  # ONNX opset: every op of the graph is there, and runtimes since 2022 load it
INPUT = "images"  # (batch, S, S, 3) uint8, RGB, the model's size
OUTPUTS = {
    "masks": "(batch, S, S) uint8 class index per pixel",
    "confidence": "(batch,) float32 mean top-class probability over the image",
    "low_confidence_fraction": "(batch,) float32 fraction of pixels whose top class has < 0.5",
}
USER_ERROR_MARK = "raydeeplab-user-error: "  # the child's stderr line for a UserError, whose message follows


class ExportError(UserError):
    """A user error the TensorFlow process found (the preset fails to load there)."""


def export_model(
    spec: str,
    fmt: str,
    output: str,
    batch_size: int | None = None,
    num_classes: int = 21,
    image_size: int | None = None,
    model_cache: str | None = None,
) -> dict:
    """``--model`` -> ``fmt`` files under ``output`` (local or ``s3://``), with ``raydeeplab.json``
    (classes, size, inputs and outputs) beside them; returns that JSON."""
    from raydeeplab.architectures import ARCHITECTURES
    from raydeeplab.presets import SIDECAR, check_model_spec, describe_model, load_model, save_model

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx" and importlib.util.find_spec("tf2onnx") is None:
        raise ExportError("--format onnx needs tf2onnx; pip install 'raydeeplab[export]'")
    check_model_spec(spec)
    with storage.reaching("--output", output, "write"):
        storage.check_writable(output)
    with tempfile.TemporaryDirectory() as tmp:
        preset = spec
        if spec in ARCHITECTURES:  # the random weights the JAX actors build (seeded), not TF's own
            preset = os.path.join(tmp, "preset")
            save_model(load_model(spec, num_classes, image_size), preset, architecture=spec)
        local = os.path.join(tmp, "export") if storage.is_remote(output) else output
        os.makedirs(local, exist_ok=True)
        saved_model = local if fmt == "saved_model" else os.path.join(tmp, "saved_model")
        run_child(preset, saved_model, batch_size, model_cache)
        if fmt == "onnx":
            convert_to_onnx(saved_model, os.path.join(local, ONNX_FILE))
        info = describe_model(preset)
        written = {
            "format": fmt,
            "model": spec,
            "file": ONNX_FILE if fmt == "onnx" else ".",
            "image_size": info.image_size,
            "batch_size": batch_size,
            "class_names": list(info.class_names),
            "inputs": {INPUT: f"(batch, {info.image_size}, {info.image_size}, 3) uint8 RGB, resized (no crop) to this size"},
            "outputs": OUTPUTS,
            "bytes": folder_bytes(local),
        }
        with open(os.path.join(local, SIDECAR), "w") as f:
            json.dump(written, f, indent=2)
        if local != output:
            with storage.reaching("--output", output, "write"):
                storage.upload_dir(local, output)
    return written


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def run_child(preset: str, saved_model: str, batch_size: int | None, model_cache: str | None) -> None:
    """:func:`write_saved_model` in a Python process on Keras' TensorFlow backend."""
    argv = ["-m", "raydeeplab.export", preset, saved_model, str(batch_size or 0), model_cache or ""]
    run_python(argv, {"KERAS_BACKEND": "tensorflow"}, "export on Keras' TensorFlow backend")


def convert_to_onnx(saved_model: str, path: str) -> None:
    """tf2onnx's own SavedModel converter (its command): a SavedModel's captured constants stay
    constants, where converting the ``tf.function`` made them extra graph inputs."""
    argv = ["-m", "tf2onnx.convert", "--saved-model", saved_model, "--output", path, "--opset", str(OPSET)]
    run_python(argv, {}, "tf2onnx")


def run_python(argv: list[str], env: dict[str, str], what: str) -> None:
    """``python *argv``; a user error it reports is raised here, any other failure is its last line."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"), **env}
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=False)
    if verbose():
        sys.stderr.write(done.stderr)
    lines = done.stderr.strip().splitlines() or ["(no output)"]
    marked = [line.removeprefix(USER_ERROR_MARK) for line in lines if line.startswith(USER_ERROR_MARK)]
    if marked:
        raise ExportError(marked[-1])
    if done.returncode:
        raise RuntimeError(f"{what} failed: {lines[-1]}")


def build_export_model(segmenter, batch_size: int | None = None):
    """``(batch, S, S, 3) uint8`` -> the named :data:`OUTPUTS`: the actors' graph
    (:func:`~raydeeplab.segmenter.build_mask_model`) with each image whole (no padding box).

    Keras' argmax of a float tensor guards against -0.0 with a bit cast, an op ONNX Runtime has
    not got; probabilities are never -0.0, and the first class whose probability reaches the top
    one is the same index, found with integer ops.
    """
    import keras

    from raydeeplab.segmenter import (
        LOW_CONFIDENCE,
        class_scores,
        probabilities,
        uint8_inputs,
    )

    images, x = uint8_inputs(segmenter, batch_size)
    probs = probabilities(segmenter, class_scores(segmenter, x))
    top = keras.ops.max(probs, axis=-1)
    is_top = keras.ops.cast(probs >= top[..., None], "int32")
    outputs = (
        keras.ops.cast(keras.ops.argmax(is_top, axis=-1), "uint8"),
        keras.ops.mean(top, axis=(1, 2)),
        keras.ops.mean(keras.ops.cast(top < LOW_CONFIDENCE, "float32"), axis=(1, 2)),
    )
    return keras.Model(images, dict(zip(OUTPUTS, outputs)), name="export_model")


def write_saved_model(preset: str, output: str, batch_size: int | None, model_cache: str | None) -> None:
    """Runs on the TensorFlow backend: load ``preset``, write its :func:`build_export_model` as a
    SavedModel (signature ``serving_default``) to ``output``."""
    import tensorflow as tf

    from raydeeplab.presets import load_model

    net = build_export_model(load_model(preset, cache_dir=model_cache), batch_size)
    [images] = net.inputs
    spec = tf.TensorSpec((batch_size, *images.shape[1:]), tf.uint8, name=INPUT)  # a KerasTensor's batch would be freed
    net.export(output, format="tf_saved_model", input_signature=[spec], verbose=False)


if __name__ == "__main__":  # the child of run_child: preset output batch_size(0: dynamic) model_cache
    preset, output, batch, cache = sys.argv[1:]
    try:
        write_saved_model(preset, output, int(batch) or None, cache or None)
    except UserError as err:
        print(USER_ERROR_MARK + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(1)
