"""Architectures: every registered name builds offline, and DeepLabV3+ is keras-hub's own network."""

import numpy as np
import pytest

from raydeeplab.architectures import ARCHITECTURES, ModelError, build_model
from raydeeplab.segmenter import Segmenter


def test_architecture_names_cover_the_issue():
    names = set(ARCHITECTURES)
    for depth in (18, 50, 101):
        assert {f"deeplabv3plus_resnet{depth}", f"deeplabv3plus_resnet{depth}_v2"} <= names
    assert {f"segformer_b{i}" for i in range(6)} | {"tiny"} <= names


@pytest.mark.parametrize("arch", ["deeplabv3plus_resnet18", "deeplabv3plus_resnet50_v2", "segformer_b0"])
def test_architectures_build_offline_and_predict_full_size_masks(arch):
    model = build_model(arch, num_classes=3, image_size=64)
    masks = Segmenter(model, batch_size=2).predict(np.zeros((3, 64, 64, 3), np.uint8))
    assert masks.shape == (3, 64, 64) and masks.max() < 3


def test_bad_sizes_are_refused():
    with pytest.raises(ModelError, match="--image-size must be a multiple of 32, got 100"):
        build_model("tiny", 3, 100)
    with pytest.raises(ModelError, match="--num-classes must be at least 2"):
        build_model("tiny", 1, 64)


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

    model = build_model("deeplabv3plus_resnet50", num_classes=21, image_size=512)
    preset = keras_hub.models.DeepLabV3Backbone.presets["deeplab_v3_plus_resnet50_pascalvoc"]
    assert model.backbone.count_params() == preset["metadata"]["params"] == 39_190_656
    assert model.count_params() == guide_deeplab_v3_plus(21, RESNET50).count_params() == 39_196_032
    # conv5 feeds the head: every encoder weight is on the path to the logits.
    assert model.backbone.spatial_pyramid_pooling_key == "P5"


def test_weights_load_across_between_our_build_and_keras_hubs(tmp_path):
    """Save ours, load into the guide's network built independently (and back): same outputs."""
    resnet18 = dict(stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[2, 2, 2, 2], block_type="basic_block")
    ours = build_model("deeplabv3plus_resnet18", num_classes=4, image_size=64)
    theirs = guide_deeplab_v3_plus(4, resnet18)
    ours.save_weights(str(tmp_path / "ours.weights.h5"))
    theirs.load_weights(str(tmp_path / "ours.weights.h5"))
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(theirs(x, training=False)), np.asarray(ours(x, training=False)), rtol=1e-5, atol=1e-5
    )
    theirs.save_weights(str(tmp_path / "theirs.weights.h5"))
    ours.load_weights(str(tmp_path / "theirs.weights.h5"))
