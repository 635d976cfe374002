"""Ray role: evaluation. The batch-inference actors over a labelled split, scored at the source
resolution (the predicted mask is resized back exactly as ``predict`` writes it), with one
confusion matrix per batch summed in the driver: exact, not an average of averages.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from raydeeplab import storage
from raydeeplab.batch import ERROR, IMAGE, MASK, SegmenterPredictor
from raydeeplab.config import ConfigError, PredictConfig
from raydeeplab.data import voc
from raydeeplab.data.images import resize_image, resize_mask
from raydeeplab.metrics import ConfusionMatrix

TRUTH, MATRIX = "truth", "matrix"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    data: str
    model: str
    split: str = "val"
    layout: str = "auto"
    num_classes: int = 21  # architectures only
    image_size: int | None = None  # architectures only
    batch_size: int = 16
    actors: int | None = None
    gpus_per_actor: float | None = None
    output: str | None = None  # folder for metrics JSON and gallery.png
    gallery: int = 0

    def predict_config(self) -> PredictConfig:
        return PredictConfig(
            input=self.data, output=self.output or "", model=self.model, batch_size=self.batch_size,
            image_size=self.image_size, num_classes=self.num_classes, actors=self.actors,
            gpus_per_actor=self.gpus_per_actor,
        )  # fmt: skip


def load_eval_batch(batch: dict, size: int) -> dict:
    """{image_uri, mask_uri} -> IMAGE (n, S, S, 3) uint8 for the model, TRUTH at source size."""
    images, truths = [], []
    for image_uri, mask_uri in zip(batch[voc.IMAGE_URI], batch[voc.MASK_URI]):
        image, mask = voc.load_example(image_uri, mask_uri)
        images.append(resize_image(image, size))
        truths.append(mask)
    truth = np.empty(len(truths), object)
    truth[:] = truths
    return {IMAGE: np.stack(images), TRUTH: truth, ERROR: np.array([""] * len(images))}


def batch_confusion(batch: dict, num_classes: int) -> dict:
    """Masks back to each truth's size (nearest, as ``predict`` writes them), then counted."""
    matrix = ConfusionMatrix(num_classes)
    for mask, truth in zip(batch[MASK], batch[TRUTH]):
        matrix.update(truth, resize_mask(mask, *truth.shape))
    return {MATRIX: matrix.matrix.reshape(1, -1)}


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Scores over the whole split (and a gallery when asked). Ray must be initialised."""
    import ray

    from raydeeplab.batch import actor_resources
    from raydeeplab.model import describe_model

    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    info = describe_model(cfg.model, cfg.num_classes, cfg.image_size)
    pairs = voc.split_pairs(cfg.data, cfg.layout, cfg.split)
    voc.validate_pairs(pairs, info.num_classes)
    gpus_per_actor, actors = actor_resources(cfg.predict_config())
    matrices = (
        ray.data.from_items(pairs)
        .map_batches(load_eval_batch, batch_size=cfg.batch_size, fn_kwargs={"size": info.image_size})
        .map_batches(
            SegmenterPredictor,
            fn_constructor_kwargs={"cfg": cfg.predict_config(), "on_gpu": gpus_per_actor > 0},
            batch_size=cfg.batch_size,
            num_gpus=gpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=actors),
        )
        .map_batches(batch_confusion, fn_kwargs={"num_classes": info.num_classes})
    )
    total = ConfusionMatrix(info.num_classes)
    for batch in matrices.iter_batches(batch_size=None, batch_format="numpy"):
        total.matrix += batch[MATRIX].sum(0).reshape(info.num_classes, info.num_classes)
    scores = {
        **total.compute(),
        "class_names": list(info.class_names),
        "images": len(pairs),
        "split": cfg.split,
        "model": cfg.model,
    }
    if cfg.output:
        name = f"eval_{cfg.split}.json"
        storage.write_bytes(storage.join(cfg.output, name), json.dumps(scores, indent=2).encode())
        if cfg.gallery:
            write_gallery(cfg.model, pairs[: cfg.gallery], storage.join(cfg.output, "gallery.png"))
    return scores


def write_gallery(model_uri: str, pairs: list[voc.Pair], path: str) -> str:
    """The guide's plot: image | true mask | predicted mask for each pair, as one PNG."""
    from raydeeplab.model import load_model
    from raydeeplab.predict import Segmenter
    from raydeeplab.viz import gallery_png

    segmenter = Segmenter(load_model(model_uri), batch_size=max(len(pairs), 1))
    examples = [voc.load_example(p[voc.IMAGE_URI], p[voc.MASK_URI]) for p in pairs]
    resized = np.stack([resize_image(image, segmenter.image_size) for image, _ in examples])
    masks = segmenter.predict(resized)
    predicted = [resize_mask(m, *truth.shape) for m, (_, truth) in zip(masks, examples)]
    titles = [p[voc.IMAGE_URI].rsplit("/", 1)[-1] for p in pairs]
    storage.write_bytes(
        path, gallery_png([i for i, _ in examples], predicted, [t for _, t in examples], titles)
    )
    return path
