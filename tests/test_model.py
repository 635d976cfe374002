"""Model factory and loading: every architecture builds offline, presets round-trip exactly."""

import numpy as np
import pytest

from raydeeplab import storage
from raydeeplab.model import (
    ModelError,
    architectures,
    build_segmenter,
    check_model_spec,
    create_model,
    describe_model,
    load_model,
)
from raydeeplab.predict import Segmenter


def test_architecture_names_cover_the_issue():
    names = set(architectures())
    for depth in (18, 50, 101):
        assert {f"deeplabv3plus_resnet{depth}", f"deeplabv3plus_resnet{depth}_v2"} <= names
    assert {f"segformer_b{i}" for i in range(6)} | {"tiny"} <= names


@pytest.mark.parametrize("arch", ["deeplabv3plus_resnet18", "deeplabv3plus_resnet50_v2", "segformer_b0"])
def test_architectures_build_offline_and_predict_full_size_masks(arch):
    model = build_segmenter(arch, num_classes=3, image_size=64)
    masks = Segmenter(model, batch_size=2).predict(np.zeros((3, 64, 64, 3), np.uint8))
    assert masks.shape == (3, 64, 64) and masks.max() < 3


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


def test_bad_sizes_are_refused():
    with pytest.raises(ModelError, match="--image-size must be a multiple of 32, got 100"):
        build_segmenter("tiny", 3, 100)
    with pytest.raises(ModelError, match="--num-classes must be at least 2"):
        build_segmenter("tiny", 1, 64)
