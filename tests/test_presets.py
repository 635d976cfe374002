"""Presets: a saved model round-trips exactly, locally and on S3; what names nothing is refused."""

import numpy as np
import pytest

from raydeeplab import storage
from raydeeplab.architectures import ModelError
from raydeeplab.presets import check_model_spec, create_model, describe_model, load_model
from raydeeplab.segmenter import Segmenter


def test_local_and_s3_presets_round_trip_exactly(tmp_path, bucket):
    create_model("tiny", num_classes=5, image_size=64, output=str(tmp_path / "tiny"))
    storage.upload_dir(str(tmp_path / "tiny"), f"{bucket}/models/tiny")
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)

    local = load_model(str(tmp_path / "tiny"))
    remote = load_model(f"{bucket}/models/tiny", cache_dir=str(tmp_path / "cache"))
    for a, b in zip(local.get_weights(), remote.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(Segmenter(local, 4).predict(images), Segmenter(remote, 4).predict(images))
    assert describe_model(f"{bucket}/models/tiny").num_classes == 5
    assert describe_model(str(tmp_path / "tiny")).image_size == 64


def test_architecture_weights_are_the_same_in_every_process():
    """Actors each build an architecture by name: they must agree without sharing anything."""
    a, b = load_model("tiny", num_classes=3), load_model("tiny", num_classes=3)
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "spec, message",
    [("resnet_9000", "is not an architecture"), ("/nonexistent/dir/", "is not an architecture")],
)
def test_unknown_models_are_refused_with_the_value(spec, message):
    with pytest.raises(ModelError, match=message):
        check_model_spec(spec)


def test_a_folder_without_a_preset_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        check_model_spec(str(tmp_path))
