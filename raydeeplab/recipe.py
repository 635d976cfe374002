"""The DeepLabV3+ fine-tuning recipe of the Keras guide, Ray-free: model, optimiser, loss, metric,
process setup, the validation batches, and the full resume state (weights, optimiser slots,
step, epoch) as plain files. :mod:`raydeeplab.train` runs it on Ray Train's workers.

SGD (momentum 0.9, weight decay 1e-4, clipnorm 10) with cosine decay from
0.007 * global_batch / 16 over the real number of steps; sparse cross-entropy from logits
with label 255 ignored; each validation batch's confusion matrix counted on the device,
summed on the host in int64 (exact over any split size) and scored by
:class:`raydeeplab.metrics.ConfusionMatrix`.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import keras
import keras_hub
import numpy as np

from raydeeplab import storage
from raydeeplab.config import TrainConfig, training_precision
from raydeeplab.architectures import ARCHITECTURES, ModelError, build_model, deeplab_v3_plus
from raydeeplab.data import examples, voc
from raydeeplab.data.images import IGNORE_LABEL
from raydeeplab.data.transforms import resize_for_eval
from raydeeplab.presets import check_model_spec, local_preset
from raydeeplab.segmenter import uint8_inputs

OPTIMIZER, STATE = "optimizer.npz", "state.json"


def base_learning_rate(cfg: TrainConfig) -> float:
    return cfg.learning_rate or 0.007 * cfg.batch_size / 16


def build_optimizer(cfg: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    schedule = keras.optimizers.schedules.CosineDecay(base_learning_rate(cfg), max(total_steps, 1))
    return keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        clipnorm=cfg.clipnorm,
    )


class ConfusionMatrixMetric(keras.metrics.Metric):
    """Flat ``num_classes**2`` int32 confusion matrix (row = truth) of one validation batch.

    Under ``keras.distribution.DataParallel`` the update sees the *global* batch, so the
    matrix is the exact sum over all workers. Keras' JAX ``test_on_batch`` resets metrics at
    the start of every call, so callers read it after each batch (:func:`confusion_matrix`)
    and sum on the host in int64; one batch's counts fit int32 (a cell holds at most
    batch x H x W pixels). Its result is those counts: the scores come from their sum, once,
    in :class:`raydeeplab.metrics.ConfusionMatrix` (the one mean-IoU formula).
    """

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL, name="confusion", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = self.add_variable(
            shape=(num_classes * num_classes,), initializer="zeros", dtype="int32", name="matrix"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        n = self.num_classes
        truth = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        pred = keras.ops.reshape(keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32"), (-1,))
        valid = keras.ops.logical_and(truth != self.ignore_label, truth < n)
        index = keras.ops.where(valid, truth * n + pred, n * n)  # ignored pixels -> overflow bin
        ones = keras.ops.ones_like(index)  # segment_sum, not bincount: static size under jit
        counts = keras.ops.segment_sum(ones, index, num_segments=n * n + 1)[: n * n]
        self.matrix.assign_add(keras.ops.cast(counts, "int32"))

    def result(self):
        """The ``(num_classes, num_classes)`` counts (an average of per-batch scores would not be
        the split's score)."""
        return keras.ops.reshape(self.matrix, (self.num_classes,) * 2)

    def reset_state(self):
        self.matrix.assign(keras.ops.zeros(self.matrix.shape, "int32"))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_label": self.ignore_label}


def local_value(variable) -> np.ndarray:
    """A replicated variable's value from this process's own copy: no collective needed."""
    value = variable.value
    shards = getattr(value, "addressable_shards", None)
    return np.asarray(shards[0].data if shards else value)


def confusion_matrix(metric: ConfusionMatrixMetric) -> np.ndarray:
    return local_value(metric.matrix).astype(np.int64).reshape(metric.num_classes, metric.num_classes)


def join_processes(coordinator: str, world: int, rank: int) -> None:
    """``jax.distributed`` over CPU processes (gloo collectives), at ``coordinator`` (``ip:port``).

    On GPUs ``JaxTrainer`` initialises ``jax.distributed`` itself; on CPUs it does not, so the
    workers join here, and from there both paths are the same (:func:`configure_keras`).
    """
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, world, rank)


def configure_keras(cfg: TrainConfig) -> None:
    """Seed, precision and data parallelism, on every process *before* any model is built.

    The seed is what makes processes agree: on GPUs ``JaxTrainer`` initialises
    ``jax.distributed`` itself, so Keras' own cross-process seed sync (inside
    ``keras.distribution.initialize``) never runs, and JAX refuses to place random initial
    values that differ per process on the global mesh.
    """
    import jax

    keras.utils.set_random_seed(cfg.seed)
    precision = training_precision(cfg.precision, cfg.gpus_per_worker > 0)
    keras.config.set_dtype_policy(precision)
    if len(jax.devices()) > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
        )


def without_activation(model: keras_hub.models.ImageSegmenter) -> keras_hub.models.ImageSegmenter:
    """The same network with a linear head: the loss takes logits, a softmax head (the guide
    builds one with ``activation="softmax"``) would be softmaxed twice. Argmax is unchanged."""
    if getattr(model, "activation", None) in (None, "linear"):
        return model
    plain = type(model).from_config({**model.get_config(), "activation": None})
    plain.set_weights(model.get_weights())
    return plain


def initial_model(cfg: TrainConfig) -> keras_hub.models.ImageSegmenter:
    """``--model`` as the starting point: an architecture (random), a segmenter preset to
    fine-tune, or a backbone preset (e.g. ``resnet_50_imagenet``) under a new DeepLabV3+ head."""
    spec = cfg.model
    if spec in ARCHITECTURES:
        return build_model(spec, cfg.num_classes, cfg.image_size)
    local = local_preset(spec) if storage.is_remote(spec) else spec
    if os.path.isdir(local) and os.path.exists(os.path.join(local, "task.json")) or (
        not os.path.isdir(local) and spec in keras_hub.models.ImageSegmenter.presets
    ):
        model = keras_hub.models.ImageSegmenter.from_preset(local)
        if model.num_classes != cfg.num_classes:
            raise ModelError(
                f"--model {spec} predicts {model.num_classes} classes but --num-classes is {cfg.num_classes}"
            )
        return without_activation(model)
    try:
        encoder = keras_hub.models.Backbone.from_preset(local)
    except Exception as err:
        check_model_spec(spec)
        raise ModelError(f"--model {spec}: cannot load a backbone or segmenter: {err}") from None
    return deeplab_v3_plus(encoder, cfg.num_classes, cfg.image_size)


def trainable_model(model: keras.Model) -> keras.Model:
    """uint8 images in, float32 logits out: the network trains on what ``predict`` feeds it."""
    images, x = uint8_inputs(model)
    logits = keras.ops.cast(model(x), "float32")  # bf16 compute, float32 loss
    return keras.Model(images, logits, name="trainable_segmenter")


def compile_for_training(trainable: keras.Model, cfg: TrainConfig, total_steps: int) -> ConfusionMatrixMetric:
    metric = ConfusionMatrixMetric(cfg.num_classes)
    trainable.compile(
        optimizer=build_optimizer(cfg, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE_LABEL),
        metrics=[metric],
    )
    trainable.optimizer.build(trainable.trainable_variables)
    return metric


def save_train_state(model: keras.Model, trainable: keras.Model, directory: str, state: dict, class_names: list[str]) -> None:
    """Preset files of ``model`` (loadable by ``predict``) + ``trainable``'s optimiser slots +
    counters, side by side.

    Call on *every* worker: saving weights is collective under JAX multi-process
    (one rank alone would deadlock); only rank 0's directory is reported.
    """
    from raydeeplab.presets import save_model

    save_model(model, directory, class_names=class_names)
    np.savez(
        os.path.join(directory, OPTIMIZER),
        **{f"v{i}": local_value(v) for i, v in enumerate(trainable.optimizer.variables)},
    )
    with open(os.path.join(directory, STATE), "w") as f:
        json.dump(state, f, indent=2)


def restore_train_state(trainable: keras.Model, directory: str) -> dict:
    """Load optimiser slots (momentum, iteration count: the LR schedule's position) and counters."""
    with np.load(os.path.join(directory, OPTIMIZER)) as saved:
        for i, variable in enumerate(trainable.optimizer.variables):
            variable.assign(saved[f"v{i}"])
    with open(os.path.join(directory, STATE)) as f:
        return json.load(f)


# ---------------------------------------------------------------- validation data


def rank_slice(pairs: list, rank: int, world: int) -> list:
    """This worker's share of ``pairs``, padded with ``None`` so every worker runs as many steps."""
    share = pairs[rank::world]
    return share + [None] * (math.ceil(len(pairs) / world) - len(share))


def val_batches(pairs: list[voc.ExampleURIs | None], size: int, batch: int, num_classes: int):
    """Fixed-shape (images, masks) batches; ``None`` entries are padding (all-ignore masks). The
    next batch loads while this one is used, no further: ``pool.map`` over the whole share held
    every decoded example of it at once (VOC val on one worker, 512 px: 1.4 GiB)."""

    def load(pair):
        if pair is None:
            return np.zeros((size, size, 3), np.uint8), np.full((size, size), IGNORE_LABEL, np.uint8)
        example = examples.load_training_example(pair[voc.IMAGE_URI], pair[voc.MASK_URI], num_classes)
        return resize_for_eval(*example, size)

    padded = pairs + [None] * (-len(pairs) % batch)
    chunks = iter([padded[start : start + batch] for start in range(0, len(padded), batch)])
    with ThreadPoolExecutor(8) as pool:  # I/O bound: S3 reads overlap
        ahead = [pool.submit(load, pair) for pair in next(chunks, [])]
        while ahead:
            current, ahead = ahead, [pool.submit(load, pair) for pair in next(chunks, [])]
            chunk = [future.result() for future in current]
            yield np.stack([c[0] for c in chunk]), np.stack([c[1] for c in chunk])
