"""One process of a 2-process JAX job initialised the way ``JaxTrainer`` does on GPUs:
plain ``jax.distributed.initialize`` (no ``keras.distribution.initialize``, so no Keras seed
sync). Run by tests/test_distributed.py: ``python -m tests.gpu_path_worker RANK PORT WORKDIR``.

For each model source (architecture name, backbone preset, segmenter preset, checkpoint)
it builds the model through :mod:`raydeeplab.recipe` and trains one data-parallel step.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(rank: int, port: int, workdir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU stand-in for NCCL
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)

    from raydeeplab.hub import keras_without_tensorflow

    keras_without_tensorflow()  # as train_loop_per_worker does, before anything imports keras_hub
    import numpy as np

    from raydeeplab import recipe
    from raydeeplab.config import TrainConfig

    base = dict(data="unused", output="unused", num_classes=3, image_size=64, batch_size=4, workers=2, epochs=1)
    recipe.configure_keras(TrainConfig(model="tiny", **base))
    rng = np.random.default_rng(rank)  # each process feeds its own half of the global batch
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (2, 64, 64), dtype=np.uint8)

    def train_step(segmenter, cfg) -> float:
        model = recipe.trainable_model(segmenter)
        recipe.compile_for_training(model, cfg, total_steps=4)
        return float(model.train_on_batch(images, masks, return_dict=True)["loss"])

    losses = {}
    for source in ("tiny", os.path.join(workdir, "backbone"), os.path.join(workdir, "segmenter")):
        cfg = TrainConfig(model=source, **base)
        segmenter = recipe.initial_model(cfg)
        losses[os.path.basename(source)] = train_step(segmenter, cfg)

    # Resume: save the full training state (collective), load it back as a restarted worker does.
    import keras_hub

    cfg = TrainConfig(model="tiny", **base)
    segmenter = recipe.initial_model(cfg)
    model = recipe.trainable_model(segmenter)
    recipe.compile_for_training(model, cfg, total_steps=4)
    model.train_on_batch(images, masks)
    checkpoint = os.path.join(workdir, f"checkpoint_rank{rank}")
    recipe.save_train_state(segmenter, model, checkpoint, {"epoch": 1}, [f"class_{i}" for i in range(cfg.num_classes)])
    restored = keras_hub.models.ImageSegmenter.from_preset(checkpoint)
    resumed = recipe.trainable_model(restored)
    recipe.compile_for_training(resumed, cfg, total_steps=4)
    state = recipe.restore_train_state(resumed, checkpoint)
    losses["checkpoint"] = float(resumed.train_on_batch(images, masks, return_dict=True)["loss"])
    with open(os.path.join(workdir, f"result_rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "epoch": state["epoch"], "processes": jax.process_count(), "tensorflow": "tensorflow" in sys.modules}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
