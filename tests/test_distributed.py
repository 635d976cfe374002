"""Multi-worker GPU training's initialisation, emulated on CPU (CI has no GPU).

On GPUs ``JaxTrainer`` calls ``jax.distributed.initialize`` itself, so Keras' cross-process
seed sync never runs; without a common seed, JAX refuses to place per-process random initial
values on the global mesh and the model build crashes. Two real processes here are initialised
exactly that way, and every model source must build and train a data-parallel step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.s3_server import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_presets(workdir: str) -> None:
    """A backbone preset and a segmenter preset (softmax-headed, as the Keras guide builds it)."""
    import keras_hub

    from raydeeplab.architectures import TINY_RESNET, build_resnet, deeplab_v3_plus

    build_resnet(TINY_RESNET).save_to_preset(os.path.join(workdir, "backbone"))
    guide = deeplab_v3_plus(build_resnet(TINY_RESNET), num_classes=3, image_size=64)
    softmax = keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=guide.backbone, num_classes=3, preprocessor=guide.preprocessor, activation="softmax"
    )
    softmax.save_to_preset(os.path.join(workdir, "segmenter"))


def test_two_processes_initialised_like_jaxtrainer_on_gpus_train_from_every_model_source(tmp_path):
    make_presets(str(tmp_path))
    port = free_port()
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.gpu_path_worker", str(rank), str(port), str(tmp_path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for rank, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    results = [json.loads((tmp_path / f"result_rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["processes"] == 2 for r in results)
    assert not any(r["tensorflow"] for r in results)  # as in a real train worker (raydeeplab.hub)
    assert set(results[0]["losses"]) == {"tiny", "backbone", "segmenter", "checkpoint"}
    # One data-parallel step: both processes computed the same global loss.
    for source, loss in results[0]["losses"].items():
        assert loss == results[1]["losses"][source] and loss == loss, source
    assert results[0]["epoch"] == 1
