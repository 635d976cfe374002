"""Ray role: evaluation. The batch-inference actors over a labelled split, with one confusion
matrix per batch summed in the driver: exact, not an average of averages.

Images reach the model by the ``--resize`` policy every mode shares (``data.images.fit_image``:
stretched, or padded keeping the aspect); the box that says where the image lies in the model's
square travels with it. Two protocols (``--protocol``):

- ``voc`` (default, the Pascal VOC definition): label 255 ignored, scored at the source
  resolution (the predicted mask restored exactly as ``predict`` writes it);
- ``guide`` (the Keras DeepLabV3+ guide's definition): label 255 counted as background,
  scored at the model's resolution (truth resized to the image's box, the whole square when
  stretched), so our numbers sit beside the guide's published ones.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from raydeeplab import storage
from raydeeplab.batch import BOX, ERROR, IMAGE, MASK, SegmenterPredictor
from raydeeplab.config import ConfigError, EvaluateConfig
from raydeeplab.data import voc
from raydeeplab.data.examples import load_example, validate_pairs
from raydeeplab.data.images import IGNORE_LABEL, fit_image, resize_mask, restore_mask
from raydeeplab.metrics import ConfusionMatrix
from raydeeplab.report import write_eval_report

TRUTH, MATRIX = "truth", "matrix"


def scored_truth(mask: np.ndarray, box: np.ndarray, protocol: str) -> np.ndarray:
    """The ``(h, w) uint8`` truth a protocol scores: ``voc`` the source mask, ``guide`` the mask
    resized to the image's ``box`` in the model's square, with 255 relabelled background."""
    if protocol == "voc":
        return mask
    y0, y1, x0, x1 = (int(v) for v in box)
    mask = resize_mask(mask, y1 - y0, x1 - x0)
    return np.where(mask == IGNORE_LABEL, np.uint8(0), mask)


def load_eval_batch(batch: dict, size: int, protocol: str, resize: str) -> dict:
    """{image_uri, mask_uri} -> IMAGE (n, S, S, 3) uint8 fitted by ``resize``, BOX (n, 4) int32
    where each image lies, TRUTH as the protocol scores it."""
    images, boxes, truths = [], [], []
    for image_uri, mask_uri in zip(batch[voc.IMAGE_URI], batch[voc.MASK_URI]):
        image, mask = load_example(image_uri, mask_uri)
        model_input, box = fit_image(image, size, resize)
        images.append(model_input)
        boxes.append(box)
        truths.append(scored_truth(mask, box, protocol))
    truth = np.empty(len(truths), object)
    truth[:] = truths
    return {IMAGE: np.stack(images), BOX: np.stack(boxes), TRUTH: truth, ERROR: np.array([""] * len(images))}


def batch_confusion(batch: dict, num_classes: int) -> dict:
    """Masks restored to each truth's size (as ``predict`` writes them; for the guide's truth,
    the box's part of the square), then counted."""
    matrix = ConfusionMatrix(num_classes)
    for mask, box, truth in zip(batch[MASK], batch[BOX], batch[TRUTH]):
        matrix.update(truth, restore_mask(mask, box, *truth.shape))
    return {MATRIX: matrix.matrix.reshape(1, -1)}


def check_evaluate_config(cfg: EvaluateConfig) -> tuple[Any, list[voc.ExampleURIs]]:
    """Everything that can be checked before the cluster: --data reachable, the model and the
    sizes asked for, every mask of the split, --output writable. Returns (model info, pairs)."""
    from raydeeplab.presets import check_sizes_agree, describe_model  # keras-hub: not for CPU stages

    with storage.reaching("--data", cfg.data):
        storage.check_reachable(cfg.data)
        if not storage.exists(cfg.data):
            raise ConfigError(f"--data {cfg.data}: {storage.why_missing(cfg.data)}")
    info = describe_model(cfg.model, cfg.num_classes, cfg.image_size)
    check_sizes_agree(cfg.model, info, cfg.given("num_classes"), cfg.image_size)
    with storage.reaching("--data", cfg.data):
        pairs = voc.split_pairs(cfg.data, cfg.layout, cfg.split)
        validate_pairs(pairs, info.num_classes)
    if cfg.output:
        with storage.reaching("--output", cfg.output, "write"):
            storage.check_writable(cfg.output)
    return info, pairs


def run_evaluate(cfg: EvaluateConfig, checked: tuple[Any, list[voc.ExampleURIs]] | None = None) -> dict:
    """Scores over the whole split (and a gallery when asked). Ray must be initialised;
    ``checked`` is what :func:`check_evaluate_config` returned (checked here when not given)."""
    import ray

    from raydeeplab.batch import actor_resources

    info, pairs = checked or check_evaluate_config(cfg)
    gpus_per_actor, actors = actor_resources(cfg)
    matrices = (
        ray.data.from_items(pairs)
        .map_batches(
            load_eval_batch,
            batch_size=cfg.batch_size,
            fn_kwargs={"size": info.image_size, "protocol": cfg.protocol, "resize": cfg.resize},
        )
        .map_batches(
            SegmenterPredictor,
            fn_constructor_kwargs={"cfg": cfg, "on_gpu": gpus_per_actor > 0},
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
        "protocol": cfg.protocol,
    }
    if cfg.output:
        suffix = "" if cfg.protocol == "voc" else f"_{cfg.protocol}"  # both can share a folder
        name = f"eval_{cfg.split}{suffix}.json"
        storage.write_bytes(storage.join(cfg.output, name), json.dumps(scores, indent=2).encode())
        write_eval_report(cfg.output, scores, total.matrix)
        if cfg.gallery:
            write_gallery(cfg.model, pairs[: cfg.gallery], storage.join(cfg.output, "gallery.png"), cfg.resize)
    return scores


def write_gallery(model_uri: str, pairs: list[voc.ExampleURIs], path: str, resize: str = "stretch") -> str:
    """The guide's plot: image | true mask | predicted mask for each pair, as one PNG (training's
    gallery: stretched, as it trains)."""
    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import Segmenter
    from raydeeplab.viz import gallery_png

    segmenter = Segmenter(load_model(model_uri), batch_size=max(len(pairs), 1))
    examples = [load_example(p[voc.IMAGE_URI], p[voc.MASK_URI]) for p in pairs]
    fitted = [fit_image(image, segmenter.image_size, resize) for image, _ in examples]
    masks = segmenter.predict(np.stack([model_input for model_input, _ in fitted]))
    predicted = [restore_mask(m, box, *truth.shape) for m, (_, box), (_, truth) in zip(masks, fitted, examples)]
    titles = [p[voc.IMAGE_URI].rsplit("/", 1)[-1] for p in pairs]
    storage.write_bytes(
        path, gallery_png([i for i, _ in examples], predicted, [t for _, t in examples], titles)
    )
    return path
