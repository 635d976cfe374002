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
from raydeeplab.segmenter import Segmenter


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


def guide_deeplab_v3_plus(num_classes: int, encoder_kwargs: dict):
    """DeepLabV3+ written out with keras-hub's public API as the Keras guide and keras-hub's
    ``DeepLabV3Backbone`` docstring build it (ResNet encoder, ASPP on P5, 8x upsampling, P2 decoder)."""
    import keras_hub

    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_strides=[1, 2, 2, 2],
        **encoder_kwargs,
    )  # fmt: skip
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder, projection_filters=48, low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P5", upsampling_size=8, dilation_rates=[6, 12, 18],
    )  # fmt: skip
    return keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=num_classes)


RESNET50 = dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 6, 3], block_type="bottleneck_block")


def test_deeplabv3plus_resnet50_has_the_parameters_of_keras_hubs_preset():
    """keras-hub's preset metadata counts the backbone: 39,190,656 (the guide's summary adds
    the 21-class head: 39,196,032). Attaching ASPP to P4 dropped conv5 (31,593,856)."""
    import keras_hub

    model = build_segmenter("deeplabv3plus_resnet50", num_classes=21, image_size=512)
    preset = keras_hub.models.DeepLabV3Backbone.presets["deeplab_v3_plus_resnet50_pascalvoc"]
    assert model.backbone.count_params() == preset["metadata"]["params"] == 39_190_656
    assert model.count_params() == guide_deeplab_v3_plus(21, RESNET50).count_params() == 39_196_032
    # conv5 feeds the head: every encoder weight is on the path to the logits.
    assert model.backbone.spatial_pyramid_pooling_key == "P5"


def test_weights_load_across_between_our_build_and_keras_hubs(tmp_path):
    """Save ours, load into the guide's network built independently (and back): same outputs."""
    resnet18 = dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[2, 2, 2, 2], block_type="basic_block")
    ours = build_segmenter("deeplabv3plus_resnet18", num_classes=4, image_size=64)
    theirs = guide_deeplab_v3_plus(4, resnet18)
    ours.save_weights(str(tmp_path / "ours.weights.h5"))
    theirs.load_weights(str(tmp_path / "ours.weights.h5"))
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(theirs(x, training=False)), np.asarray(ours(x, training=False)), rtol=1e-5, atol=1e-5
    )
    theirs.save_weights(str(tmp_path / "theirs.weights.h5"))
    ours.load_weights(str(tmp_path / "theirs.weights.h5"))
