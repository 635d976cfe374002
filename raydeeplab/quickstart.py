"""``raydeeplab quickstart``: the whole product offline on local Ray, in minutes on 2 CPU cores.

1. makes a small labelled dataset (coloured shapes over real photos shipped inside scikit-image);
2. scores an untrained tiny model on it, trains one on 2 Ray Train workers, scores it again;
3. segments a folder of images with the trained model through the batch pipeline (photos,
   the validation images and one deliberately broken file, which is recorded, not fatal);
4. writes the gallery: images beside their true and predicted masks.
"""

from __future__ import annotations

import numpy as np

from raydeeplab import storage
from raydeeplab.batch import run_predict
from raydeeplab.config import EvaluateConfig, PredictConfig, TrainConfig
from raydeeplab.data import synthetic, voc
from raydeeplab.data.images import encode_jpeg
from raydeeplab.evaluate import run_evaluate
from raydeeplab.train import BEST, run_train

CLASSES, SIZE = 4, 64


def make_images_to_segment(folder: str, val_pairs: list[voc.ExampleURIs]) -> None:
    """Photos, the validation images, and a truncated JPEG to show bad input is survivable."""
    for name, photo in zip(synthetic.PHOTOS, synthetic.load_photos()):
        storage.write_bytes(storage.join(folder, "photos", f"{name}.jpg"), encode_jpeg(photo))
    for pair in val_pairs:
        name = pair[voc.IMAGE_URI].rsplit("/", 1)[-1]
        storage.write_bytes(storage.join(folder, "val", name), storage.read_bytes(pair[voc.IMAGE_URI]))
    broken = encode_jpeg(np.full((120, 160, 3), 128, np.uint8))
    storage.write_bytes(storage.join(folder, "broken", "truncated.jpg"), broken[: len(broken) // 3])


def say(text: str) -> None:
    print(f"raydeeplab quickstart: {text}", flush=True)


def quickstart(output: str, images: int = 48, epochs: int = 8) -> dict:
    """Run the demo into ``output`` (absolute or ``s3://``: Ray workers run in other folders);
    prints a line per phase and returns the scores and paths."""
    data = storage.join(output, "data")
    if not storage.exists(storage.join(data, "ImageSets")):
        synthetic.make_shapes_dataset(data, images, size=(96, 128), num_classes=CLASSES, photos=True)
    val_pairs = voc.split_pairs(data, "voc", "val")
    say(f"{images} labelled examples in {data}, {len(val_pairs)} of them held out for validation")
    run = storage.join(output, "run")

    def score(model: str) -> float:
        cfg = EvaluateConfig(data=data, model=model, num_classes=CLASSES, image_size=SIZE, batch_size=8)
        return run_evaluate(cfg)["mean_iou"]

    untrained = score("tiny")
    say(f"untrained tiny model: held-out mean IoU {untrained:.3f}")
    train_cfg = TrainConfig(
        data=data, output=run, model="tiny", num_classes=CLASSES, image_size=SIZE, batch_size=8,
        epochs=epochs, learning_rate=0.05, workers=2, gallery=6,
    )  # fmt: skip
    state = run_train(train_cfg)
    trained = score(storage.join(run, BEST))
    say(
        f"trained {state['epoch']} epochs on 2 Ray Train workers: held-out mean IoU {trained:.3f} "
        f"(untrained {untrained:.3f})"
    )
    to_segment = storage.join(output, "images")
    if not storage.exists(to_segment):
        make_images_to_segment(to_segment, val_pairs)
    predictions = storage.join(output, "predictions")
    summary = run_predict(PredictConfig(input=to_segment, output=predictions, model=storage.join(run, BEST), batch_size=8))
    print(summary.line())
    return {
        "untrained_mean_iou": untrained,
        "trained_mean_iou": trained,
        "gallery": storage.join(run, "gallery.png"),
        "masks": storage.join(predictions, "masks"),
        "parquet": storage.join(predictions, "predictions"),
        "ok": summary.ok,
        "failed": summary.failed,
    }
