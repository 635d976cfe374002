"""The one place that turns pixels into classes: batch inference, serving and evaluation all call it.

Speed comes from three rules measured on an H100 (see ``bench/infer.py``):

- uint8 crosses to the device (4x fewer bytes than float32); normalisation runs there;
- argmax runs there too, so a ``uint8`` mask comes back, not float32 logits (1,668 vs 46-81 img/s);
- every call sees the same batch shape (the last partial batch is padded), so XLA compiles once.
"""

from __future__ import annotations

import os
from typing import Callable

import keras
import numpy as np

from raydeeplab.model import input_size

DEFAULT_COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "raydeeplab", "xla")


def enable_compilation_cache(path: str | None = None) -> None:
    """JAX persistent compilation cache: a restarted actor loads its executable instead of compiling."""
    if keras.backend.backend() != "jax":
        return
    import jax

    path = path or DEFAULT_COMPILE_CACHE
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def uint8_inputs(segmenter: keras.Model, batch_size: int | None = None):
    """``(images, normalised)``: a uint8 Input and its float32 normalisation (the preset's own).

    Inference and training both feed uint8 and normalise on the device: 4x fewer bytes cross.
    """
    converter = segmenter.preprocessor.image_converter
    size = input_size(segmenter)
    scale = np.asarray(1.0 if converter.scale is None else converter.scale, "float32")
    offset = np.asarray(0.0 if converter.offset is None else converter.offset, "float32")
    images = keras.Input((size, size, 3), batch_size=batch_size, dtype="uint8", name="images")
    return images, keras.ops.cast(images, "float32") * scale + offset


def build_mask_model(segmenter: keras.Model, batch_size: int) -> keras.Model:
    """``(batch, S, S, 3) uint8`` -> ``(batch, S, S) uint8`` class map, normalisation included."""
    images, x = uint8_inputs(segmenter, batch_size)
    logits = segmenter(x, training=False)  # keras-hub #2495: never leak BatchNorm training mode
    masks = keras.ops.cast(keras.ops.argmax(logits, axis=-1), "uint8")
    return keras.Model(images, masks, name="mask_model")


def compile_inference(net: keras.Model) -> Callable[[np.ndarray], object]:
    """A pure, compiled forward function; returns a *device* array (call :func:`to_host` on it).

    Returning before the result is fetched lets a caller dispatch the next batch while
    this one runs (JAX dispatch is asynchronous), which is how host and device overlap.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        state = (
            [v.value for v in net.trainable_variables],
            [v.value for v in net.non_trainable_variables],
        )

        @jax.jit
        def forward(state, images):
            return net.stateless_call(*state, images, training=False)[0]

        return lambda images: forward(state, images)
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec(net.inputs[0].shape, tf.uint8)
        forward = tf.function(lambda images: net(images, training=False), input_signature=[spec])
        return forward
    return lambda images: net.predict_on_batch(images)


def to_host(array) -> np.ndarray:
    return np.asarray(array)


class Segmenter:
    """Fixed-shape, on-device segmentation of uint8 image batches.

    >>> Segmenter(model, batch_size=8).predict(images)  # (n, S, S, 3) uint8 -> (n, S, S) uint8
    """

    def __init__(self, segmenter: keras.Model, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = segmenter
        self.batch_size = batch_size
        self.image_size = input_size(segmenter)
        self.num_classes = segmenter.num_classes
        self._forward = compile_inference(build_mask_model(segmenter, batch_size))

    def warmup(self) -> None:
        """Compile now (or load from the persistent cache), not on the first real batch."""
        self.predict(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3) uint8`` -> ``(n, S, S) uint8``; any n, always ``batch_size``-shaped calls."""
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise ValueError(
                f"expected (n, {self.image_size}, {self.image_size}, 3) uint8 images, "
                f"got {images.shape} {images.dtype}"
            )
        n = len(images)
        if n == 0:
            return np.zeros((0, self.image_size, self.image_size), np.uint8)
        padded = -n % self.batch_size
        if padded:
            images = np.concatenate([images, np.zeros((padded, *expected), np.uint8)])
        # Dispatch every chunk before fetching any: the device works while the host waits.
        pending = [
            self._forward(images[start : start + self.batch_size])
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate([to_host(chunk) for chunk in pending])[:n]
