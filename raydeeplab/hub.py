"""Processes that only run models load Keras and keras-hub without TensorFlow (on JAX or torch).

keras-hub imports TensorFlow at import time wherever it is installed (for ``tf.data``
preprocessing and text tokenisers), and ``keras.utils.set_random_seed`` imports it to seed
``tf.random``; both fall back when it is absent, as on any machine without TensorFlow. It is
installed here for ``model export``, yet every process that loaded a model paid for it: on this
project's CPU machine a batch actor with the tiny model (warm compilation cache) was ready 5.5-5.7 s
after its process started and held 1,090 MiB; without TensorFlow, 3.3-3.6 s and 520 MiB.

:func:`keras_without_tensorflow` is called first thing by the processes this project owns: the
CLI's driver, batch and evaluation actors, Serve replicas, training workers. It is not applied
on import: a user's own code may call keras-hub's ``predict`` with a preprocessor, which needs
``tf.data``. Only imports made by Keras' and keras-hub's own code are refused, and only while
TensorFlow is not loaded: other code imports it as usual, and from then on Keras uses it too.
"""

from __future__ import annotations

import importlib.abc
import sys

SKIPPED = ("tensorflow", "tensorflow_text")
ASKERS = ("keras", "keras_hub")


class KerasWithoutTensorFlow(importlib.abc.MetaPathFinder):
    """Answers Keras' and keras-hub's ``import tensorflow`` as a machine without TensorFlow would."""

    def find_spec(self, name, path=None, target=None):
        if (
            name.partition(".")[0] in SKIPPED and "tensorflow" not in sys.modules
            and importer() in ASKERS and not tensorflow_backend()
        ):  # fmt: skip
            raise ModuleNotFoundError(f"No module named {name!r} (left out for Keras by raydeeplab.hub)", name=name)
        return None


def tensorflow_backend() -> bool:
    """Whether Keras runs on TensorFlow, which then loads it; asked at import time, so installing
    the finder imports nothing (an unknown backend counts as TensorFlow: nothing is refused)."""
    config = sys.modules.get("keras.src.backend.config")
    return config is None or config.backend() == "tensorflow"


def importer() -> str:
    """Top-level package of the code running the ``import``, below the import machinery."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "").partition(".")[0]


def keras_without_tensorflow() -> None:
    """From now on in this process, Keras and keras-hub run without TensorFlow unless Keras' backend
    is TensorFlow or something else loads it. Call before keras-hub is imported; idempotent."""
    if not any(isinstance(f, KerasWithoutTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, KerasWithoutTensorFlow())
