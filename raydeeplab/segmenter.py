"""The one place that turns pixels into classes: batch inference, serving and evaluation all call it.

Speed comes from three rules measured on an H100 (see ``bench/infer.py``):

- uint8 crosses to the device (4x fewer bytes than float32); normalisation runs there;
- argmax runs there too, so a ``uint8`` mask comes back, not float32 logits (1,668 vs 46-81 img/s),
  with each image's confidence (two floats) reduced in the same pass;
- every call sees the same batch shape (the last partial batch is padded), so XLA compiles once.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import keras
import numpy as np

from raydeeplab.presets import input_size
from raydeeplab.storage import CACHE_ROOT
from raydeeplab.tta import TestTimeAugmentation

NO_TTA = TestTimeAugmentation()

DEFAULT_COMPILE_CACHE = os.path.join(CACHE_ROOT, "xla")


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


def build_mask_model(
    segmenter: keras.Model, batch_size: int, tta: TestTimeAugmentation = NO_TTA
) -> keras.Model:
    """``[(batch, S, S, 3) uint8 images, (batch, 4) int32 boxes]`` -> ``[(batch, S, S) uint8 masks,
    (batch,) float32 confidence, (batch,) float32 low-confidence fraction]``, normalisation included.

    Confidence is the per-pixel top-class probability, averaged over each image's box
    ``(y0, y1, x0, x1)`` (the pixels that are the image, not padding), in the pass that takes the
    argmax: nothing but a few bytes more comes back.
    """
    images, x = uint8_inputs(segmenter, batch_size)
    boxes = keras.Input((4,), batch_size=batch_size, dtype="int32", name="boxes")
    probs = augmented_probabilities(segmenter, x, tta)
    masks = keras.ops.cast(keras.ops.argmax(probs, axis=-1), "uint8")
    confidence, low = box_means(keras.ops.max(probs, axis=-1), boxes)
    return keras.Model([images, boxes], [masks, confidence, low], name="mask_model")


def build_tile_model(
    segmenter: keras.Model, batch_size: int, overlap: int, tta: TestTimeAugmentation = NO_TTA
) -> keras.Model:
    """Tiles for :class:`raydeeplab.tiling.SceneAssembler`: ``[(batch, S, S, 3) uint8, (batch, 4)
    int32 centre boxes]`` -> ``[(batch, S, S) uint8 class map, (batch,) float32 sum of the top-class
    probability over the box, (batch,) float32 pixels below the threshold there, (batch, band_pixels,
    C) float16 blend-weighted probabilities of the band cells]``. Only the overlaps come back as
    floats: 44% of a 512 tile at overlap 64, in half the bytes of float32.
    """
    from raydeeplab.tiling import band_pieces, blend_window

    images, x = uint8_inputs(segmenter, batch_size)
    boxes = keras.Input((4,), batch_size=batch_size, dtype="int32", name="boxes")
    probs = augmented_probabilities(segmenter, x, tta)
    masks = keras.ops.cast(keras.ops.argmax(probs, axis=-1), "uint8")
    area = box_area(boxes, probs.shape[1])
    confidence, low = (mean * area for mean in box_means(keras.ops.max(probs, axis=-1), boxes))
    size = probs.shape[1]
    weighted = probs * blend_window(size, overlap)[None, :, :, None]
    pieces = [
        keras.ops.reshape(weighted[:, rows, cols, :], (batch_size, -1, probs.shape[-1]))
        for rows, cols in band_pieces(size, overlap)
    ]
    bands = keras.ops.cast(keras.ops.concatenate(pieces, axis=1), "float16")
    return keras.Model([images, boxes], [masks, confidence, low, bands], name="tile_model")


def augmented_probabilities(segmenter: keras.Model, x, tta: TestTimeAugmentation = NO_TTA):
    """Class probabilities at ``x``'s size, averaged over ``tta``'s views (each scale, mirrored
    too with ``flip``), all inside one compiled program: ``tta.passes`` forward passes of the
    same fixed-shape batch, no Python loop per image. Scaled views are resized bilinearly to a
    multiple of 32 and their probabilities back to ``x``'s size."""
    size = x.shape[1]
    total = None
    for side in tta.sides(size):
        view = x if side == size else keras.ops.image.resize(x, (side, side), interpolation="bilinear")
        for flipped in (False, True) if tta.flip else (False,):
            probs = probabilities(segmenter, class_scores(segmenter, keras.ops.flip(view, 2) if flipped else view))
            probs = keras.ops.flip(probs, 2) if flipped else probs
            if side != size:
                probs = keras.ops.image.resize(probs, (size, size), interpolation="bilinear")
            total = probs if total is None else total + probs
    return total if tta.passes == 1 else total / tta.passes


def class_scores(segmenter: keras.Model, x):
    """The segmenter's output for ``x`` (inference mode), with DeepLabV3+'s 1x1 classifier moved
    before the backbone's final bilinear upsampling.

    keras-hub upsamples 256 feature channels to the full input size and then classifies; both
    steps are linear per channel (bilinear weights sum to 1, the head is a plain 1x1 conv), so
    classifying first and upsampling ``num_classes`` channels gives the same scores up to float
    rounding, with a full-resolution tensor 256/num_classes times smaller (12x for VOC): the
    difference between fitting batch 64 at 512 px on one GPU or not. Other architectures run as is.
    """
    backbone, head = getattr(segmenter, "backbone", None), getattr(segmenter, "output_conv", None)
    try:
        upsample = backbone.get_layer("backbone_output_upsampling")
    except (AttributeError, ValueError):
        return segmenter(x, training=False)  # keras-hub #2495: never training mode
    if head.kernel.shape[:2] != (1, 1) or head.use_bias:
        return segmenter(x, training=False)
    features = keras.Model(backbone.input, upsample.input)(x, training=False)
    kernel = keras.ops.cast(head.kernel[0, 0], features.dtype)
    scores = upsample(keras.ops.einsum("bhwc,ck->bhwk", features, kernel))
    return head.activation(scores)


LOW_CONFIDENCE = 0.5  # a pixel whose top class has less than this is counted as low confidence


def probabilities(segmenter: keras.Model, outputs):
    """float32 class probabilities from the head's outputs (logits, unless it already softmaxes)."""
    outputs = keras.ops.cast(outputs, "float32")
    if getattr(segmenter, "activation", None) == "softmax":
        return outputs
    return keras.ops.softmax(outputs, axis=-1)


def box_area(boxes, size: int):
    (y0, y1, x0, x1) = (keras.ops.clip(boxes[:, i], 0, size) for i in range(4))
    return keras.ops.cast(keras.ops.maximum(y1 - y0, 0) * keras.ops.maximum(x1 - x0, 0), "float32")


def box_means(top, boxes):
    """Mean of ``top (n, S, S)`` and fraction below :data:`LOW_CONFIDENCE`, inside each box."""
    size = top.shape[1]
    ys = keras.ops.arange(size, dtype="int32")[None, :, None]
    xs = keras.ops.arange(size, dtype="int32")[None, None, :]
    within = [
        keras.ops.greater_equal(ys, boxes[:, 0, None, None]), keras.ops.less(ys, boxes[:, 1, None, None]),
        keras.ops.greater_equal(xs, boxes[:, 2, None, None]), keras.ops.less(xs, boxes[:, 3, None, None]),
    ]  # fmt: skip
    inside = keras.ops.cast(functools.reduce(keras.ops.logical_and, within), "float32")
    area = keras.ops.maximum(box_area(boxes, size), 1.0)
    low = keras.ops.cast(top < LOW_CONFIDENCE, "float32")
    return keras.ops.sum(top * inside, axis=(1, 2)) / area, keras.ops.sum(low * inside, axis=(1, 2)) / area


def compile_inference(net: keras.Model) -> Callable[..., object]:
    """A pure, compiled forward function of ``net``'s inputs; returns *device* arrays (call
    :func:`to_host` on them).

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
        def forward(state, inputs):
            return net.stateless_call(*state, inputs, training=False)[0]

        return lambda *inputs: forward(state, list(inputs))
    if backend == "tensorflow":
        import tensorflow as tf

        specs = [tf.TensorSpec(i.shape, i.dtype) for i in net.inputs]
        forward = tf.function(lambda *inputs: net(list(inputs), training=False), input_signature=specs)
        return forward
    return lambda *inputs: net.predict_on_batch(list(inputs))


def to_host(array) -> np.ndarray:
    return np.asarray(array)


class Prediction(NamedTuple):
    masks: np.ndarray  # (n, S, S) uint8
    confidence: np.ndarray  # (n,) float32: mean top-class probability inside the box
    low_confidence_fraction: np.ndarray  # (n,) float32: fraction of those pixels below LOW_CONFIDENCE


class TilePrediction(NamedTuple):
    masks: np.ndarray  # (n, S, S) uint8: each tile's own argmax (its centre cell is final)
    top_sum: np.ndarray  # (n,) float32: sum of the top-class probability over the centre box
    low_count: np.ndarray  # (n,) float32: pixels there below LOW_CONFIDENCE
    bands: np.ndarray  # (n, band_pixels, C) float16: w * p of the band cells


class Segmenter:
    """Fixed-shape, on-device segmentation of uint8 image batches.

    >>> Segmenter(model, batch_size=8).predict(images)  # (n, S, S, 3) uint8 -> (n, S, S) uint8
    """

    def __init__(self, segmenter: keras.Model, batch_size: int, tta: TestTimeAugmentation = NO_TTA):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = segmenter
        self.batch_size = batch_size
        self.tta = tta
        self.image_size = input_size(segmenter)
        self.num_classes = segmenter.num_classes
        self._forward = compile_inference(build_mask_model(segmenter, batch_size, tta))
        self._tile_forward: dict[int, Callable] = {}  # overlap -> compiled tile model

    def warmup(self, overlap: int | None = None) -> None:
        """Compile now (or load from the persistent cache), not on the first real batch."""
        empty = np.zeros((1, self.image_size, self.image_size, 3), np.uint8)
        if overlap is None:
            self.predict(empty)
        else:
            self.segment_tiles(empty, self.full_boxes(1), overlap)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3) uint8`` -> ``(n, S, S) uint8``; any n, always ``batch_size``-shaped calls."""
        return self.segment(images).masks

    def segment(self, images: np.ndarray, boxes: np.ndarray | None = None) -> Prediction:
        """Masks and confidence; ``boxes (n, 4)`` ``(y0, y1, x0, x1)``: where each image is not
        padding (default: all of it)."""
        return Prediction(*self.run(self._forward, images, boxes))

    def segment_tiles(self, tiles: np.ndarray, boxes: np.ndarray, overlap: int) -> TilePrediction:
        """Tiles of a larger image (see :mod:`raydeeplab.tiling`); ``boxes``: their centre boxes."""
        if overlap not in self._tile_forward:
            model = build_tile_model(self.model, self.batch_size, overlap, self.tta)
            self._tile_forward[overlap] = compile_inference(model)
        return TilePrediction(*self.run(self._tile_forward[overlap], tiles, boxes))

    def full_boxes(self, n: int) -> np.ndarray:
        return np.tile(np.array([0, self.image_size, 0, self.image_size], np.int32), (n, 1))

    def run(self, forward: Callable, images: np.ndarray, boxes: np.ndarray | None) -> list[np.ndarray]:
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise ValueError(
                f"expected (n, {self.image_size}, {self.image_size}, 3) uint8 images, "
                f"got {images.shape} {images.dtype}"
            )
        n = len(images)
        boxes = self.full_boxes(n) if boxes is None else np.asarray(boxes, np.int32)
        padded = -n % self.batch_size
        if padded or n == 0:
            padded = padded or self.batch_size  # n == 0: one padded call gives every output's shape
            images = np.concatenate([images, np.zeros((padded, *expected), np.uint8)])
            boxes = np.concatenate([boxes, self.full_boxes(padded)])
        # Dispatch every chunk before fetching any: the device works while the host waits.
        pending = [
            forward(images[start : start + self.batch_size], boxes[start : start + self.batch_size])
            for start in range(0, len(images), self.batch_size)
        ]
        chunks = [[to_host(output) for output in outputs] for outputs in pending]
        return [np.concatenate(parts)[:n] for parts in zip(*chunks)]
