"""Ray role: training. Keras 3 on JAX under ``ray.train.v2.jax.JaxTrainer``, data-parallel over
every device of every worker (``keras.distribution.DataParallel``).

Reads top to bottom as the recipe: list and check the data (driver, before any cluster
work) -> stream decoded, augmented batches through Ray Data -> train with equal step counts
on every worker -> validate over the whole split (each batch's confusion matrix counted on the
device over the global batch, summed on the host in int64) -> report metrics with a checkpoint
to Ray Train. ``OUT`` receives::

    _ray/raydeeplab-train/    Ray Train's run: checkpoint_<time>/ folders (preset + optimizer.npz
                              + state.json + metrics.json) and the snapshot that lists them
    _ray/user_error.txt       a user error met inside the cluster (the run ends, no retry)
    best/, last/              exported from the ``Result``: keras-hub presets with metrics.json
                              (loadable by predict, evaluate and serve)
    metrics.json, gallery.png

A worker failure restarts the group (``FailureConfig``); a rerun of the same command resumes.
Both continue from ``ray.train.get_checkpoint()``: the newest checkpoint Ray Train registered,
which it lists in the run's snapshot only once every worker has finished reporting it (a
half-uploaded folder is never listed, so never loaded). A rerun finds that snapshot because
the run's name and storage path under ``OUT`` stay the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time

import numpy as np

from raydeeplab import storage, telemetry
from raydeeplab.config import ConfigError, TrainConfig
from raydeeplab.data import examples, voc
from raydeeplab.data.transforms import train_transform
from raydeeplab.errors import UserError
from raydeeplab.hub import keras_without_tensorflow

logger = logging.getLogger(__name__)

IMAGE, MASK = "image", "mask"
BEST, LAST, METRICS = "best", "last", "metrics.json"
RAY_FOLDER, RUN_NAME = "_ray", "raydeeplab-train"  # OUT/_ray/raydeeplab-train: the same run on a rerun
KEEP_CHECKPOINTS, SCORE = 2, "mean_iou"  # the best 2 by mean IoU, plus the newest


# ---------------------------------------------------------------- driver side, no Ray


def dataset_pairs(cfg: TrainConfig) -> tuple[list[voc.ExampleURIs], list[voc.ExampleURIs]]:
    """(train, val) image/mask URI pairs. VOC + ``--sbd`` trains on the standard train_aug set."""
    if cfg.sbd and voc.resolve_layout(cfg.data, cfg.layout) == "voc":
        train = voc.train_aug_pairs(cfg.data, cfg.sbd)
    else:
        train = voc.split_pairs(cfg.data, cfg.layout, cfg.train_split)
    return train, voc.split_pairs(cfg.data, cfg.layout, cfg.val_split)


def check_train_config(cfg: TrainConfig) -> tuple[list[voc.ExampleURIs], list[voc.ExampleURIs]]:
    """Everything that can be checked before the cluster: flags, model, splits, every mask."""
    from raydeeplab.architectures import ARCHITECTURES
    from raydeeplab.presets import check_model_spec

    for flag, root in (("--data", cfg.data), ("--sbd", cfg.sbd)):
        if root:
            with storage.reaching(flag, root):
                storage.check_reachable(root)
                if not storage.exists(root):
                    raise ConfigError(f"{flag} {root}: {storage.why_missing(root)}")
    if storage.is_inside(cfg.output, cfg.data):
        raise ConfigError(f"--output {cfg.output} is inside --data {cfg.data}")
    if cfg.model in ARCHITECTURES:
        print(
            f"raydeeplab train: warning: --model {cfg.model} is an architecture name: training starts "
            "from random weights (no pretrained backbone); for real data pass a backbone preset "
            "such as resnet_50_imagenet or a segmenter preset",
            file=sys.stderr,
        )
    elif storage.is_remote(cfg.model) or os.path.isdir(cfg.model):
        check_model_spec(cfg.model, backbone_ok=True)  # hub names are checked by keras-hub when downloaded
        check_segmenter_sizes(cfg)
    with storage.reaching("--data", cfg.data):
        train, val = dataset_pairs(cfg)
        examples.validate_pairs(train, cfg.num_classes, check_limit=cfg.check_limit)
        examples.validate_pairs(val, cfg.num_classes, check_limit=cfg.check_limit)
    per_worker = cfg.batch_size // cfg.workers
    if len(train) // cfg.workers < per_worker:
        raise ConfigError(
            f"--batch-size {cfg.batch_size}: {len(train)} training examples give no full batch "
            f"on each of {cfg.workers} workers"
        )
    with storage.reaching("--output", cfg.output, "write"):
        storage.check_writable(cfg.output)
    return train, val


def fine_tunes_a_segmenter(cfg: TrainConfig) -> bool:
    """``--model`` is a segmenter preset folder (not a backbone under a new head, nor a name)."""
    folder = storage.is_remote(cfg.model) or os.path.isdir(cfg.model)
    return folder and storage.exists(storage.join(cfg.model, "task.json"))


def check_segmenter_sizes(cfg: TrainConfig) -> None:
    """A segmenter preset to fine-tune has its own class count and input size (its graph is built
    for it): flags that differ failed in every worker instead, and Ray Train retried them."""
    from raydeeplab.presets import describe_model

    if not fine_tunes_a_segmenter(cfg):
        return  # a backbone preset: a new head, any size
    info = describe_model(cfg.model)
    for flag, value, own in (("--num-classes", cfg.num_classes, info.num_classes), ("--image-size", cfg.image_size, info.image_size)):
        if value != own:
            default = "" if cfg.given(flag[2:].replace("-", "_")) is not None else " (the default)"
            raise ConfigError(f"{flag} {value}{default} disagrees with --model {cfg.model}, which has {own}: pass {flag} {own}")


def placement_shortfall(cfg: TrainConfig, nodes: list[dict]) -> str | None:
    """Why ``cfg``'s workers cannot all be placed on ``nodes`` (each a ``{"CPU": n, "GPU": n}``
    total), leaving at least one CPU for Ray Data's loading tasks; ``None`` when they can.

    Per node, not in total: a worker's GPUs and CPUs must all be on one node.
    """
    free = [{"CPU": n.get("CPU", 0.0), "GPU": n.get("GPU", 0.0)} for n in nodes]
    placed = 0
    for node in free:
        while placed < cfg.workers and node["CPU"] >= cfg.cpus_per_worker and node["GPU"] >= cfg.gpus_per_worker:
            node["CPU"] -= cfg.cpus_per_worker
            node["GPU"] -= cfg.gpus_per_worker
            placed += 1
    spare_cpus = sum(node["CPU"] for node in free)
    if placed == cfg.workers and spare_cpus >= 1:
        return None
    need = f"{cfg.cpus_per_worker:g} CPU" + (f" + {cfg.gpus_per_worker} GPU" if cfg.gpus_per_worker else "")
    have = ", ".join(f"{n.get('CPU', 0):g} CPU" + (f" + {n.get('GPU', 0):g} GPU" if n.get("GPU") else "") for n in nodes)
    return (
        f"--workers {cfg.workers} need {need} each on one node, plus 1 CPU for data loading; "
        f"the cluster's nodes have {have or 'nothing'} (only {placed} worker(s) fit"
        f"{', no CPU left for data loading' if placed == cfg.workers else ''}): "
        "use fewer --workers, a lower --cpus-per-worker/--gpus-per-worker, or a bigger cluster "
        "(on an autoscaling cluster, --wait-for-resources-s gives nodes time to join)"
    )


def wait_until_cluster_fits(cfg: TrainConfig, poll_s: float = 10.0) -> None:
    """Fail with what is missing, instead of Ray Train waiting forever for resources; on an
    autoscaling cluster, ask the autoscaler for the workers' bundles (Ray Train has not asked
    yet) and wait up to ``--wait-for-resources-s``, saying what for."""
    import ray
    from ray.autoscaler.sdk import request_resources

    deadline = time.monotonic() + cfg.wait_for_resources_s
    if cfg.wait_for_resources_s:
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
        request_resources(bundles=[bundle] * cfg.workers + [{"CPU": 1}])
    while True:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        shortfall = placement_shortfall(cfg, nodes)
        if shortfall is None:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(shortfall)
        print(f"raydeeplab train: waiting for resources: {shortfall}", file=sys.stderr, flush=True)
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def steps_per_epoch(cfg: TrainConfig, num_train: int) -> int:
    """Equal on every worker: Ray Train splits the data equally, batches drop the remainder."""
    full = (num_train // cfg.workers) // (cfg.batch_size // cfg.workers)
    return min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full


def load_train_batch(
    batch: dict, size: int, num_classes: int, min_scale: float, max_scale: float, user_error_marker: str
) -> dict:
    """{image_uri, mask_uri} -> {IMAGE (n, S, S, 3) uint8, MASK (n, S, S) uint8}, augmented."""
    rng = np.random.default_rng()  # fresh per call: every epoch sees new flips, scales and crops
    images, masks = [], []
    for image_uri, mask_uri in zip(batch[voc.IMAGE_URI], batch[voc.MASK_URI]):
        with user_errors_recorded(user_error_marker):
            example = examples.load_training_example(image_uri, mask_uri, num_classes)
        image, mask = train_transform(*example, size, rng, min_scale, max_scale)
        images.append(image)
        masks.append(mask)
    return {IMAGE: np.stack(images), MASK: np.stack(masks)}


# ---------------------------------------------------------------- on the workers


def coordinator_address() -> str:
    """``ip:port`` of a free port on this node, for ``jax.distributed``'s coordinator."""
    import socket

    import ray.util

    with socket.socket() as sock:
        sock.bind(("", 0))
        return f"{ray.util.get_node_ip_address()}:{sock.getsockname()[1]}"


def setup_distribution(cfg: TrainConfig, rank: int, world: int) -> None:
    """Data parallel over all devices of all workers. On GPUs ``JaxTrainer`` has joined the
    processes; on CPUs rank 0's coordinator address goes to every worker through Ray Train."""
    import ray.train.collective

    from raydeeplab import recipe

    if cfg.gpus_per_worker == 0 and world > 1:
        address = ray.train.collective.broadcast_from_rank_zero(coordinator_address() if rank == 0 else None)
        recipe.join_processes(address, world, rank)
    recipe.configure_keras(cfg)


def user_error_uri(output: str) -> str:
    """Where a worker records a user error, so that Ray Train's retries do not repeat it."""
    return storage.join(output, RAY_FOLDER, "user_error.txt")


@contextlib.contextmanager
def user_errors_recorded(marker: str):
    """Write a :class:`UserError`'s message to ``marker``, then re-raise. Used where the error
    happens (a Ray Data task, a train worker): Ray's wrappers drop the original exception
    object when it crosses processes, so the driver could not tell it from a crash."""
    try:
        yield
    except UserError as err:
        storage.write_bytes(marker, str(err).encode())
        raise


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point. A user error (a missing or corrupt example, classes out of
    range, a bad preset) cannot be fixed by a retry: it is written where every attempt looks,
    a restarted group then ends at once, and the driver reports it (:func:`run_train`).
    ``--max-failures`` is left for what a retry can fix: a lost node, a killed worker."""
    keras_without_tensorflow()
    cfg = TrainConfig.from_dict(config["cfg"])
    marker = user_error_uri(cfg.output)
    if storage.exists(marker):
        return
    with user_errors_recorded(marker):
        train_epochs(cfg, config)


def train_epochs(cfg: TrainConfig, config: dict) -> None:
    import keras_hub
    import ray.train

    from raydeeplab import recipe
    from raydeeplab.metrics import ConfusionMatrix

    steps, val_pairs = config["steps_per_epoch"], config["val_pairs"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    setup_distribution(cfg, rank, world)
    per_worker = cfg.batch_size // world

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group or a rerun command: continue where it stopped
        with checkpoint.as_directory() as local:
            model = keras_hub.models.ImageSegmenter.from_preset(local)
            trainable = recipe.trainable_model(model)
            metric = recipe.compile_for_training(trainable, cfg, steps * cfg.epochs)
            state = recipe.restore_train_state(trainable, local)
        logger.info("rank %d resumed from %s at epoch %d", rank, checkpoint.path, state["epoch"])
        state["resumed_at_epochs"] = state.get("resumed_at_epochs", []) + [state["epoch"]]
    else:
        model = recipe.initial_model(cfg)
        trainable = recipe.trainable_model(model)
        metric = recipe.compile_for_training(trainable, cfg, steps * cfg.epochs)
        state = {"epoch": 0, "best_mean_iou": -1.0, "history": [], "resumed_at_epochs": []}

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(state["epoch"], cfg.epochs):
        started = time.perf_counter()
        batches = shard.iter_batches(batch_size=per_worker, drop_last=True, batch_format="numpy")
        losses = []
        for _, batch in zip(range(steps), batches):
            logs = trainable.train_on_batch(batch[IMAGE], batch[MASK], return_dict=True)
            losses.append(float(logs["loss"]))
        train_seconds = time.perf_counter() - started
        telemetry.train_step(train_seconds / max(steps, 1), steps * per_worker / max(train_seconds, 1e-9))

        matrix = np.zeros((cfg.num_classes, cfg.num_classes), np.int64)
        shard_pairs = recipe.rank_slice(val_pairs, rank, world)
        for images, masks in recipe.val_batches(shard_pairs, cfg.image_size, per_worker, cfg.num_classes):
            trainable.test_on_batch(images, masks)  # resets the metric first: read each batch's counts
            matrix += recipe.confusion_matrix(metric)
        scores = ConfusionMatrix.from_matrix(matrix).compute()

        metrics = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            SCORE: scores["mean_iou"],
            "pixel_accuracy": scores["pixel_accuracy"],
            "per_class_iou": scores["per_class_iou"],
            "confusion_matrix": matrix.tolist(),
            "images_per_second": steps * cfg.batch_size / train_seconds if train_seconds else 0.0,
            "step_seconds": train_seconds / max(steps, 1),
        }
        state = {
            **state,
            "epoch": epoch + 1,
            "best_mean_iou": max(state["best_mean_iou"], scores["mean_iou"]),
            "history": state["history"] + [metrics],
        }
        with tempfile.TemporaryDirectory() as tmp:
            recipe.save_train_state(model, trainable, tmp, state, config["class_names"])  # collective: every rank saves
            with open(os.path.join(tmp, METRICS), "w") as f:
                json.dump(metrics, f, indent=2)
            # Every rank reports (a barrier); rank 0's folder is the checkpoint. The others hold
            # the same replicated values and would only upload the same files over it.
            ray.train.report(
                {k: v for k, v in metrics.items() if not isinstance(v, list)},
                checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
            )


def trained_class_names(cfg: TrainConfig) -> list[str]:
    """The names the trained presets carry: a fine-tuned segmenter preset's own (its classes are
    checked to be the same), else the default ones (VOC's for 21 classes)."""
    from raydeeplab.presets import class_names, describe_model

    return list(describe_model(cfg.model).class_names) if fine_tunes_a_segmenter(cfg) else class_names(cfg.num_classes)


def build_trainer(cfg: TrainConfig, train_pairs: list[voc.ExampleURIs], val_pairs: list[voc.ExampleURIs]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    storage_path, storage_filesystem = ray_storage(cfg.output)
    run_config = RunConfig(
        name=RUN_NAME,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=KEEP_CHECKPOINTS, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
        ),
    )
    return JaxTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "steps_per_epoch": steps_per_epoch(cfg, len(train_pairs)),
            "val_pairs": val_pairs,
            "class_names": trained_class_names(cfg),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=run_config,
        datasets={"train": build_train_dataset(cfg, train_pairs)},
    )


def build_train_dataset(cfg: TrainConfig, train_pairs: list[voc.ExampleURIs]):
    """URI pairs -> decoded, augmented examples, in a new random order every epoch."""
    return build_shuffled_pairs(train_pairs).map_batches(
        load_train_batch,
        batch_size=8,
        fn_kwargs={
            "size": cfg.image_size,
            "num_classes": cfg.num_classes,
            "min_scale": cfg.min_scale,
            "max_scale": cfg.max_scale,
            "user_error_marker": user_error_uri(cfg.output),
        },
    )


def build_shuffled_pairs(train_pairs: list[voc.ExampleURIs]):
    """The pairs as a dataset whose every execution (epoch) is a new permutation.

    The shuffle moves only the URI rows (a few hundred bytes each), before any image is read;
    Ray Train re-executes the dataset each epoch, and an unseeded ``random_shuffle`` draws a
    new permutation each time, so batch composition changes from epoch to epoch. One block
    per cluster CPU keeps decoding parallel while the all-to-all stays small: 10,582 rows
    (VOC train_aug) shuffle and stream in 1.1 s an epoch on 2 CPUs, 13 s with Ray's default
    200 blocks.
    """
    import ray

    blocks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ray.data.from_items(train_pairs, override_num_blocks=blocks).random_shuffle()


def ray_storage(output: str):
    """(storage_path, storage_filesystem) for Ray Train's run and checkpoints, under ``OUT/_ray``."""
    if not storage.is_remote(output):
        return storage.join(storage.normalize(output), RAY_FOLDER), None
    _, path = storage.filesystem(output)
    return f"{path}/{RAY_FOLDER}", storage.pyarrow_filesystem(output)


def export_checkpoint(checkpoint, uri: str) -> None:
    """A Ray Train checkpoint's files -> ``uri``: a keras-hub preset with metrics.json (plus the
    optimiser slots and counters it resumes from)."""
    with checkpoint.as_directory() as local:  # local storage: the folder itself; S3: a download
        storage.upload_dir(local, uri)


PROGRESS_EVERY_S = 30.0


@contextlib.contextmanager
def epoch_progress(cfg: TrainConfig, every_s: float = PROGRESS_EVERY_S, poll_s: float = 5.0):
    """While ``fit()`` runs, print the newest epoch's scores at most every ``every_s``.

    The driver hears nothing from Ray Train until the run ends, so it reads the metrics.json
    of the checkpoints the run registers (a plain line, whether or not stdout is a TTY).
    """
    run_dir = storage.join(cfg.output, RAY_FOLDER, RUN_NAME)

    def reported() -> set[str]:
        return set(storage.list_files(run_dir, (METRICS,))) if storage.exists(run_dir) else set()

    seen, stop = reported(), threading.Event()

    def watch() -> None:
        last = time.monotonic()
        while not stop.wait(poll_s):
            try:  # checkpoint folders sort by time: the last one is the newest epoch
                new = sorted(reported() - seen) if time.monotonic() - last >= every_s else []
                metrics = json.loads(storage.read_bytes(new[-1])) if new else None
            except (OSError, ValueError):
                continue  # still uploading, or the store is away: the next poll tries again
            if metrics:
                seen.update(new)
                last = time.monotonic()
                print(
                    f"raydeeplab train: epoch {metrics['epoch']}/{cfg.epochs}: loss {metrics['loss']:.3f}, "
                    f"validation mean IoU {metrics['mean_iou']:.3f}, {metrics['images_per_second']:.1f} img/s",
                    flush=True,
                )

    watcher = threading.Thread(target=watch, name="epoch-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def run_train(cfg: TrainConfig, pairs: tuple[list[voc.ExampleURIs], list[voc.ExampleURIs]] | None = None) -> dict:
    """Train, export best/ and last/ from Ray Train's result, write metrics.json and the gallery.
    Ray must be initialised.

    ``pairs`` is what :func:`check_train_config` returned when the caller already checked
    (the CLI does, before starting Ray): checking reads every example, so not twice.
    """
    from raydeeplab.recipe import STATE

    train_pairs, val_pairs = pairs or check_train_config(cfg)
    wait_until_cluster_fits(cfg)
    marker = user_error_uri(cfg.output)
    if storage.exists(marker):  # from an earlier run, whose data the user has since fixed
        storage.remove(marker)
    with epoch_progress(cfg):
        result = build_trainer(cfg, train_pairs, val_pairs).fit()
    with storage.reaching("--output", cfg.output, "write"):  # a store gone for good: one line
        if result.checkpoint:  # also after a failure: the epochs trained so far stay loadable
            export_checkpoint(result.get_best_checkpoint(SCORE, "max"), storage.join(cfg.output, BEST))
            export_checkpoint(result.checkpoint, storage.join(cfg.output, LAST))
        if storage.exists(marker):
            raise UserError(storage.read_bytes(marker).decode())
    if result.error:
        raise result.error
    with storage.reaching("--output", cfg.output, "write"):
        state = json.loads(storage.read_bytes(storage.join(cfg.output, LAST, STATE)))
        storage.write_bytes(storage.join(cfg.output, METRICS), json.dumps(state, indent=2).encode())
    if cfg.gallery:
        from raydeeplab.evaluate import write_gallery

        write_gallery(storage.join(cfg.output, BEST), val_pairs[: cfg.gallery], storage.join(cfg.output, "gallery.png"))
    return state
