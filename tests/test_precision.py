"""``--precision`` reaches every layer: keras-hub's ``from_preset(dtype=)`` alone left the inner
layers in float32, so a "bfloat16" run computed in float32 (found on an H200 as a 32 GiB temp)."""

import keras
import numpy as np
import pytest

from raydeeplab.presets import input_size, load_model


def layer_dtypes(model: keras.Model) -> tuple[set[str], set[str]]:
    """Keras' own view: compute and variable dtypes of every layer that holds weights."""
    layers = [layer for layer in model._flatten_layers() if layer.weights]
    return {layer.compute_dtype for layer in layers}, {str(v.dtype) for v in model.weights}


@pytest.mark.parametrize("source", ["architecture", "preset"])
@pytest.mark.parametrize("dtype, variables", [("bfloat16", "bfloat16"), ("mixed_bfloat16", "float32")])
def test_every_layer_takes_the_precision(tiny_model, source, dtype, variables):
    spec = "tiny" if source == "architecture" else tiny_model
    reference = load_model(spec, num_classes=5, image_size=64)
    model = load_model(spec, num_classes=5, image_size=64, dtype=dtype)

    assert layer_dtypes(reference) == ({"float32"}, {"float32"})
    assert layer_dtypes(model) == ({"bfloat16"}, {variables})
    size = input_size(model)
    x = np.random.default_rng(0).uniform(-2, 2, (2, size, size, 3)).astype("float32")
    expected = np.asarray(reference(x, training=False))
    got = np.asarray(keras.ops.cast(model(x, training=False), "float32"))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()  # bf16 rounding, same weights
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.98
