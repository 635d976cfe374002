"""raydeeplab.hub: on JAX, a batch actor loads and runs its model without TensorFlow, with the same
masks as where TensorFlow is loaded, and other code can still import TensorFlow."""

import os
import subprocess
import sys

import numpy as np

ACTOR = """
import sys
if sys.argv[1] == "tensorflow-first":
    import tensorflow  # as a user's tf.data code would: then Keras and keras-hub use it
import numpy as np
from raydeeplab.batch import BOX, ERROR, IMAGE, MASK, SegmenterPredictor
from raydeeplab.config import ActorOptions
actor = SegmenterPredictor(ActorOptions(model="tiny", num_classes=5, image_size=64, batch_size=2), on_gpu=False)
images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
boxes = np.tile(np.array([0, 64, 0, 64], np.int32), (3, 1))
np.save(sys.argv[2], actor({IMAGE: images, BOX: boxes, ERROR: np.array(["", "", ""])})[MASK])
loaded = "tensorflow" in sys.modules
import tensorflow  # other code still can
print(loaded, tensorflow.constant(2).numpy())
"""


def test_a_batch_actor_runs_without_tensorflow_and_gives_the_same_masks(tmp_path):
    results = {}
    for mode in ("tensorflow-first", "plain"):
        run = subprocess.run(
            [sys.executable, "-c", ACTOR, mode, str(tmp_path / f"{mode}.npy")],
            env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        results[mode] = run.stdout.split()[-2:]
    assert results == {"tensorflow-first": ["True", "2"], "plain": ["False", "2"]}
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "tensorflow-first.npy"))


def test_on_keras_tensorflow_backend_nothing_is_left_out():
    """There Keras itself needs TensorFlow, and keras-hub gets it as it would without us."""
    check = (
        "from raydeeplab.hub import keras_without_tensorflow; keras_without_tensorflow()\n"
        "import keras, keras_hub\n"
        "from keras_hub.src.utils import tensor_utils\n"
        "print(keras.backend.backend(), tensor_utils.tf is not None)"
    )
    run = subprocess.run(
        [sys.executable, "-c", check], env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["tensorflow", "True"]
