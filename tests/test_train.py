"""Training on 2 CPU workers of a real local Ray cluster, data in a real (moto) S3 bucket."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from raydeeplab import storage
from raydeeplab.config import ConfigError, TrainConfig
from raydeeplab.data import examples, synthetic
from raydeeplab.data.voc import DatasetError
from raydeeplab.data.transforms import resize_for_eval
from raydeeplab.errors import UserError
from raydeeplab.train import (
    KEEP_CHECKPOINTS,
    RUN_NAME,
    build_shuffled_pairs,
    check_train_config,
    placement_shortfall,
    ray_storage,
    run_train,
)

SIZE = 64
CLASSES = 4


def train_config(data: str, output: str, **kwargs) -> TrainConfig:
    values = dict(
        data=data, output=output, model="tiny", num_classes=CLASSES, image_size=SIZE,
        batch_size=8, epochs=2, workers=2, learning_rate=0.05, gallery=2,
    )  # fmt: skip
    return TrainConfig(**{**values, **kwargs})


def independent_confusion(model_uri: str, pairs: list[dict]) -> np.ndarray:
    """Confusion matrix by plain numpy over every val pair, one process, no Ray, no Keras metric."""
    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import Segmenter

    segmenter = Segmenter(load_model(model_uri), batch_size=4)
    matrix = np.zeros((CLASSES, CLASSES), np.int64)
    for pair in pairs:
        image, truth = resize_for_eval(*examples.load_example(pair["image_uri"], pair["mask_uri"]), SIZE)
        pred = segmenter.predict(image[None])[0]
        for t in range(CLASSES):
            for p in range(CLASSES):
                matrix[t, p] += np.sum((truth == t) & (pred == p))
    return matrix


def registered_checkpoints(output: str) -> list[tuple]:
    """(checkpoint, metrics) of every checkpoint Ray Train lists for the run under ``output``,
    as its public ``Result`` sees them (what the dashboard's Train view shows)."""
    from ray.train import Result

    path, filesystem = ray_storage(output)
    try:
        return Result.from_path(f"{path}/{RUN_NAME}", storage_filesystem=filesystem).best_checkpoints
    except RuntimeError:  # no checkpoint registered yet
        return []


@pytest.fixture(scope="module")
def voc_sbd_bucket(moto_s3):
    """VOC and SBD layouts of one generated dataset in S3 (ids overlap like the real ones)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}).mkdir("train-data")
    # 52 VOC images: 13 in val, so the 2 ranks hold 7 and 6 (+1 padding) val images, 4 batches of 2 each.
    synthetic.make_shapes_dataset("s3://train-data/VOC2012", 52, size=(48, 64), num_classes=CLASSES, layout="voc")
    synthetic.make_shapes_dataset(
        "s3://train-data/SBD", 16, size=(48, 64), num_classes=CLASSES, layout="sbd", first_index=16
    )
    return "s3://train-data"


def test_two_workers_train_from_s3_and_report_exact_metrics(ray_local, voc_sbd_bucket, bucket):
    # batch 4 over 2 workers: several validation batches per rank, uneven shards (7 and 6).
    cfg = train_config(f"{voc_sbd_bucket}/VOC2012", f"{bucket}/run", sbd=f"{voc_sbd_bucket}/SBD", batch_size=4)
    train_pairs, val_pairs = check_train_config(cfg)
    stem = lambda pair: pair["image_uri"].rsplit("/", 1)[1][:-4]  # noqa: E731
    voc_val = {stem(p) for p in val_pairs}
    sbd_ids = {f"img_{i:06d}" for i in range(16, 32)}
    voc_train = {f"img_{i:06d}" for i in range(52)} - voc_val
    assert len(val_pairs) == 13
    assert {stem(p) for p in train_pairs} == (voc_train | sbd_ids) - voc_val  # the train_aug rule

    state = run_train(cfg)

    history = state["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["loss"] < history[0]["loss"]
    last = json.loads(storage.read_bytes(f"{bucket}/run/last/metrics.json"))
    matrix = np.asarray(last["confusion_matrix"])
    reference = independent_confusion(f"{bucket}/run/last", val_pairs)
    # Every non-ignored validation pixel counted exactly once across the 2 workers (no padding, no duplicates).
    assert matrix.sum() == reference.sum()
    assert np.abs(matrix - reference).sum() <= 0.001 * reference.sum()  # float noise may flip a few argmaxes
    iou = np.diag(reference) / (reference.sum(0) + reference.sum(1) - np.diag(reference))
    assert last["mean_iou"] == pytest.approx(np.nanmean(iou), abs=2e-3)
    # Ray Train holds the checkpoints; best/ and last/ are exported presets predict can load.
    registered = registered_checkpoints(cfg.output)
    assert sorted(m["epoch"] for _, m in registered) == [1, 2]
    best = json.loads(storage.read_bytes(f"{bucket}/run/best/metrics.json"))
    assert best["mean_iou"] == max(m["mean_iou"] for _, m in registered)
    assert storage.exists(f"{bucket}/run/best/config.json")
    assert storage.read_bytes(f"{bucket}/run/gallery.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerunning a finished command resumes from its last checkpoint instead of starting over,
    # and never from a folder Ray Train did not register (here: an upload cut short, named newest).
    storage.write_bytes(f"{bucket}/run/_ray/{RUN_NAME}/checkpoint_9999-12-31_23-59-59.999999/state.json", b'{"epo')
    again = run_train(train_config(cfg.data, cfg.output, sbd=cfg.sbd, batch_size=4, epochs=3))
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["resumed_at_epochs"] == [2]
    assert again["history"][:2] == history
    # Ray Train keeps the best KEEP_CHECKPOINTS by mean IoU plus the newest, and deletes the rest.
    kept = registered_checkpoints(cfg.output)
    assert 3 in [m["epoch"] for _, m in kept] and len(kept) <= KEEP_CHECKPOINTS + 1
    folders = storage.list_files(f"{bucket}/run/_ray/{RUN_NAME}", ("metrics.json",))
    assert len(folders) == len(kept)


def ray_train_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_killed_worker_resumes_from_its_checkpoint(ray_local, tmp_path):
    synthetic.make_shapes_dataset(str(tmp_path / "data"), 24, size=(48, 64), num_classes=CLASSES, layout="voc")
    cfg = train_config(str(tmp_path / "data"), str(tmp_path / "run"), epochs=3, max_failures=2, gallery=0)
    result = {}
    runner = threading.Thread(target=lambda: result.update(state=run_train(cfg)))
    runner.start()
    deadline = time.monotonic() + 300
    while not registered_checkpoints(cfg.output):  # epoch 1 is checkpointed
        assert runner.is_alive() and time.monotonic() < deadline, "training ended or stalled before epoch 1"
        time.sleep(0.2)
    victims = ray_train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    runner.join(timeout=600)

    state = result["state"]
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["resumed_at_epochs"] and state["resumed_at_epochs"][0] >= 1


def test_dataset_problems_are_reported_before_training_with_the_file_name(tmp_path):
    synthetic.make_shapes_dataset(str(tmp_path / "voc"), 8, size=(48, 64), num_classes=CLASSES, layout="voc")
    with pytest.raises(DatasetError, match="class value"):
        check_train_config(train_config(str(tmp_path / "voc"), str(tmp_path / "out"), num_classes=2))
    split = tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    with pytest.raises(DatasetError, match="val.txt"):
        check_train_config(train_config(str(tmp_path / "voc"), str(tmp_path / "out")))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 7}, "--batch-size 7 must be a multiple of --workers 2"),
        ({"batch_size": 6, "gpus_per_worker": 2}, "--batch-size 6 must be a multiple of --workers 2 x --gpus-per-worker 2"),
        ({"image_size": 50}, "--image-size must be a multiple of 32, got 50"),
        ({"layout": "coco"}, "--layout must be one of"),
        ({"data": "/nonexistent"}, "--data /nonexistent: no such file or folder"),
    ],
)
def test_bad_training_flags_name_the_flag(tmp_path, kwargs, message):
    data = kwargs.pop("data", str(tmp_path))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):  # building the config or checking it
        check_train_config(train_config(data, str(tmp_path / "out"), **kwargs))


def test_a_segmenter_presets_own_sizes_are_checked_before_ray(tmp_path, tiny_model):
    """The preset's graph takes 64 px and 5 classes: other values failed in every worker, and Ray
    Train retried the group 3 times, reloading the model each time."""
    synthetic.make_shapes_dataset(str(tmp_path / "voc"), 8, size=(48, 64), num_classes=5, layout="voc")
    data, out = str(tmp_path / "voc"), str(tmp_path / "out")
    check_train_config(TrainConfig(data=data, output=out, model=tiny_model, num_classes=5, image_size=64, batch_size=2))
    for values, message in (
        ({"num_classes": 5}, f"--image-size 512 (the default) disagrees with --model {tiny_model}, which has 64: pass --image-size 64"),
        ({"num_classes": 3, "image_size": 64}, f"--num-classes 3 disagrees with --model {tiny_model}, which has 5: pass --num-classes 5"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_train_config(TrainConfig(data=data, output=out, model=tiny_model, batch_size=2, **values))


def test_a_fine_tuned_presets_class_names_are_carried_into_the_trained_presets(tmp_path, tiny_model):
    """Trained presets were saved with VOC's names for 21 classes, else class_i: a fine-tuned
    preset's own names were lost, and evaluate and serve then showed the wrong ones."""
    import shutil

    from raydeeplab import recipe
    from raydeeplab.presets import SIDECAR, describe_model
    from raydeeplab.train import trained_class_names

    source = str(tmp_path / "roads")
    shutil.copytree(tiny_model, source)
    names = ["road", "car", "person", "sign", "tree"]
    sidecar = json.loads((tmp_path / "roads" / SIDECAR).read_text())
    (tmp_path / "roads" / SIDECAR).write_text(json.dumps({**sidecar, "class_names": names}))
    cfg = TrainConfig(data="d", output="o", model=source, num_classes=5, image_size=64, batch_size=2)
    assert trained_class_names(cfg) == names
    assert trained_class_names(TrainConfig(data="d", output="o", model="tiny", num_classes=5)) == [f"class_{i}" for i in range(5)]

    model = recipe.initial_model(cfg)
    trainable = recipe.trainable_model(model)
    recipe.compile_for_training(trainable, cfg, total_steps=1)
    recipe.save_train_state(model, trainable, str(tmp_path / "best"), {"epoch": 1}, trained_class_names(cfg))
    assert describe_model(str(tmp_path / "best")).class_names == tuple(names)


def test_cli_train_rejects_a_yaml_typo_before_ray(tmp_path, capsys):
    from raydeeplab.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("data: x\noutput: y\nepocs: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown key(s) epocs" in capsys.readouterr().err


def test_a_user_error_inside_a_worker_ends_the_run_at_once_with_the_file_named(ray_local, tmp_path):
    """A corrupt example the driver did not check (``check_limit``) is met by a Ray Data task
    inside training: retrying cannot fix it, so ``--max-failures`` must not train again."""
    splits = synthetic.make_shapes_dataset(str(tmp_path / "data"), 24, size=(48, 64), num_classes=CLASSES, layout="voc")
    broken = tmp_path / "data" / "JPEGImages" / f"{splits['train'][-1]}.jpg"
    broken.write_bytes(b"not a jpeg")
    cfg = train_config(str(tmp_path / "data"), str(tmp_path / "run"), epochs=2, max_failures=2, gallery=0, check_limit=1)
    started = time.monotonic()
    with pytest.raises(UserError, match=f"{broken}: ") as caught:
        run_train(cfg)
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)
    assert not registered_checkpoints(cfg.output) and not (tmp_path / "run" / "last").exists()  # stopped in epoch 1
    print(f"user error reported after {time.monotonic() - started:.0f}s")


@pytest.mark.parametrize(
    "nodes, kwargs, missing",
    [
        ([{"CPU": 2.0}], {"workers": 2}, "no CPU left for data loading"),  # the 2-core hang
        ([{"CPU": 8.0, "GPU": 1.0}] * 8, {"workers": 2, "gpus_per_worker": 8, "batch_size": 16}, "only 0 worker(s) fit"),
        ([{"CPU": 3.0}, {"CPU": 1.0}], {"workers": 2, "cpus_per_worker": 2.0}, "only 1 worker(s) fit"),
    ],
)
def test_runs_that_cannot_be_placed_say_what_is_missing(nodes, kwargs, missing):
    message = placement_shortfall(train_config("d", "o", **kwargs), nodes)
    assert missing in message and "--workers" in message


@pytest.mark.parametrize(
    "nodes, kwargs",
    [
        ([{"CPU": 2.0}], {"workers": 2, "cpus_per_worker": 0.5}),
        ([{"CPU": 8.0, "GPU": 1.0}] * 8, {"workers": 8, "gpus_per_worker": 1, "cpus_per_worker": 6.0}),
        ([{"CPU": 0.0}, {"CPU": 8.0, "GPU": 8.0}], {"workers": 1, "gpus_per_worker": 8, "cpus_per_worker": 7.0}),
    ],
)
def test_runs_that_fit_per_node_are_accepted(nodes, kwargs):
    assert placement_shortfall(train_config("d", "o", **kwargs), nodes) is None


def test_training_order_is_a_new_permutation_every_epoch(ray_local):
    pairs = [{"image_uri": f"img_{i:05d}", "mask_uri": f"mask_{i:05d}"} for i in range(400)]
    dataset = build_shuffled_pairs(pairs)
    epochs = [[row["image_uri"] for row in dataset.iter_rows()] for _ in range(2)]
    for order in epochs:
        assert sorted(order) == [p["image_uri"] for p in pairs]
        neighbours = sum(int(b[4:]) - int(a[4:]) == 1 for a, b in zip(order, order[1:]))
        assert neighbours < 20  # block-order shuffling keeps ~all consecutive ids together
    assert epochs[0] != epochs[1]


def test_training_from_random_weights_says_so(tmp_path, capsys):
    synthetic.make_shapes_dataset(str(tmp_path / "voc"), 8, size=(48, 64), num_classes=CLASSES, layout="voc")
    check_train_config(train_config(str(tmp_path / "voc"), str(tmp_path / "out"), batch_size=2))
    assert "training starts from random weights" in capsys.readouterr().err


def test_epoch_lines_appear_while_training_runs(tmp_path, capsys):
    """The driver prints each newly registered epoch's scores (read from the run's checkpoints),
    and never a half-written metrics.json."""
    from raydeeplab.train import RAY_FOLDER, RUN_NAME, epoch_progress

    cfg = train_config("d", str(tmp_path), epochs=3)
    run = tmp_path / RAY_FOLDER / RUN_NAME
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)  # from an earlier run: not repeated
    (run / "checkpoint_2026-01-01_00-00-00.000000" / "metrics.json").write_text('{"epoch": 1}')
    with epoch_progress(cfg, every_s=0.0, poll_s=0.05):
        for epoch, text in [(2, '{"epoch": 2, "loss": 0.5'), (2, None), (3, None)]:
            folder = run / f"checkpoint_2026-01-01_00-00-0{epoch}.000000"
            folder.mkdir(exist_ok=True)
            metrics = {"epoch": epoch, "loss": 1.0 / epoch, "mean_iou": 0.1 * epoch, "images_per_second": 9.5}
            (folder / "metrics.json").write_text(text or json.dumps(metrics))
            time.sleep(0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "raydeeplab train: epoch 2/3: loss 0.500, validation mean IoU 0.200, 9.5 img/s",
        "raydeeplab train: epoch 3/3: loss 0.333, validation mean IoU 0.300, 9.5 img/s",
    ]


def test_training_data_in_a_missing_bucket_is_named_before_the_cluster(moto_s3, tmp_path):
    with pytest.raises(UserError, match="--data s3://no-such-bucket-here/VOC2012: bucket 'no-such-bucket-here' does not exist"):
        check_train_config(train_config("s3://no-such-bucket-here/VOC2012", str(tmp_path / "out")))


def test_a_local_backbone_preset_is_a_training_starting_point(tmp_path):
    """Training takes a backbone preset (config.json + weights, no task.json) under a new head."""
    from raydeeplab.architectures import TINY_RESNET, build_resnet

    build_resnet(TINY_RESNET).save_to_preset(str(tmp_path / "backbone"))
    synthetic.make_shapes_dataset(str(tmp_path / "voc"), 8, size=(48, 64), num_classes=CLASSES, layout="voc")
    train, val = check_train_config(
        train_config(str(tmp_path / "voc"), str(tmp_path / "out"), model=str(tmp_path / "backbone"), batch_size=2)
    )
    assert len(train) == 6 and len(val) == 2
