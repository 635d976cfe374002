"""Architectures: one registry, name -> builder of a randomly initialised keras-hub segmentation
model (DeepLabV3+ on a ResNet, or SegFormer on a MiT), with its preprocessor.

``tiny`` is for tests and the offline quickstart; the rest are the paper's networks. Loading,
saving and describing a *saved* model (a preset) is :mod:`raydeeplab.presets`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import keras
import keras_hub

from raydeeplab.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(UserError):
    """A ``--model`` value that names nothing loadable, or sizes no architecture takes."""


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    block_type: str
    blocks: tuple[int, int, int, int]
    filters: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_filters: int = 64
    pre_activation: bool = False


@dataclasses.dataclass(frozen=True)
class MiTSpec:
    depths: tuple[int, int, int, int]
    hidden_dims: tuple[int, int, int, int]
    projection_filters: int


RESNETS = {
    "resnet18": ResNetSpec("basic_block", (2, 2, 2, 2)),
    "resnet50": ResNetSpec("bottleneck_block", (3, 4, 6, 3)),
    "resnet101": ResNetSpec("bottleneck_block", (3, 4, 23, 3)),
}
# Table 7 of the SegFormer paper (MiT-B0 ... B5).
MITS = {
    "b0": MiTSpec((2, 2, 2, 2), (32, 64, 160, 256), 256),
    "b1": MiTSpec((2, 2, 2, 2), (64, 128, 320, 512), 256),
    "b2": MiTSpec((3, 4, 6, 3), (64, 128, 320, 512), 768),
    "b3": MiTSpec((3, 4, 18, 3), (64, 128, 320, 512), 768),
    "b4": MiTSpec((3, 8, 27, 3), (64, 128, 320, 512), 768),
    "b5": MiTSpec((3, 6, 40, 3), (64, 128, 320, 512), 768),
}
# keras-hub requires 64 filters in the stem and first stage; the rest is kept small for 2-core CI.
TINY_RESNET = ResNetSpec("basic_block", (1, 1, 1, 1), filters=(64, 32, 32, 32))


def build_resnet(spec: ResNetSpec) -> keras_hub.models.ResNetBackbone:
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[spec.stem_filters],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=list(spec.filters),
        stackwise_num_blocks=list(spec.blocks),
        stackwise_num_strides=[1, 2, 2, 2],
        block_type=spec.block_type,
        use_pre_activation=spec.pre_activation,
    )


def image_converter(cls, image_size: int):
    """Resize plus ImageNet normalisation; the segmenter reads its scale/offset to normalise on device.

    Stretched, bilinear, no antialias: keras-hub's own preprocessor then resizes as
    ``data.images.resize_image`` does, so both feed a preset the same pixels.
    """
    return cls(
        image_size=(image_size, image_size),
        crop_to_aspect_ratio=False,
        interpolation="bilinear",
        antialias=False,
        scale=[1.0 / (255.0 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
    )


def deeplab_v3_plus(
    encoder: keras.Model, num_classes: int, image_size: int
) -> keras_hub.models.DeepLabV3ImageSegmenter:
    """DeepLabV3+ exactly as keras-hub's ``deeplab_v3_plus_resnet50_pascalvoc`` and the Keras guide
    build it: ASPP (rates 6/12/18) on the encoder's last stage (P5, all of ResNet's conv5 is
    used), upsampled 8x to meet the stride-4 P2 features of the decoder (paper, Fig. 2)."""
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P5",
        upsampling_size=8,  # P5 (1/32) -> P2 (1/4), where the low-level features join
        dilation_rates=[6, 12, 18],
        low_level_feature_key="P2",
        projection_filters=48,
    )
    preprocessor = keras_hub.models.DeepLabV3ImageSegmenterPreprocessor(
        image_converter=image_converter(keras_hub.layers.DeepLabV3ImageConverter, image_size)
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=backbone, num_classes=num_classes, preprocessor=preprocessor
    )


def deeplab_v3_plus_resnet(
    spec: ResNetSpec, num_classes: int, image_size: int
) -> keras_hub.models.DeepLabV3ImageSegmenter:
    return deeplab_v3_plus(build_resnet(spec), num_classes, image_size)


def segformer(spec: MiTSpec, num_classes: int, image_size: int) -> keras_hub.models.SegFormerImageSegmenter:
    encoder = keras_hub.models.MiTBackbone(
        layerwise_depths=list(spec.depths),
        num_layers=4,
        layerwise_num_heads=[1, 2, 5, 8],
        layerwise_sr_ratios=[8, 4, 2, 1],
        max_drop_path_rate=0.1,
        layerwise_patch_sizes=[7, 3, 3, 3],
        layerwise_strides=[4, 2, 2, 2],
        hidden_dims=list(spec.hidden_dims),
        image_shape=(image_size, image_size, 3),
    )
    backbone = keras_hub.models.SegFormerBackbone(
        image_encoder=encoder, projection_filters=spec.projection_filters
    )
    preprocessor = keras_hub.models.SegFormerImageSegmenterPreprocessor(
        image_converter=image_converter(keras_hub.layers.SegFormerImageConverter, image_size)
    )
    return keras_hub.models.SegFormerImageSegmenter(
        backbone=backbone, num_classes=num_classes, preprocessor=preprocessor
    )


Builder = Callable[[int, int], keras_hub.models.ImageSegmenter]  # (num_classes, image_size) -> model

ARCHITECTURES: dict[str, Builder] = {
    "tiny": functools.partial(deeplab_v3_plus_resnet, TINY_RESNET),
    **{
        f"deeplabv3plus_{depth}{suffix}": functools.partial(
            deeplab_v3_plus_resnet, dataclasses.replace(spec, pre_activation=bool(suffix))
        )
        for depth, spec in RESNETS.items()
        for suffix in ("", "_v2")
    },
    **{f"segformer_{size}": functools.partial(segformer, spec) for size, spec in MITS.items()},
}


def default_image_size(arch: str) -> int:
    return 128 if arch == "tiny" else 512


def build_model(arch: str, num_classes: int, image_size: int) -> keras_hub.models.ImageSegmenter:
    """A randomly initialised keras-hub segmentation model with its preprocessor."""
    if num_classes < 2:
        raise ModelError(f"--num-classes must be at least 2, got {num_classes}")
    if image_size % 32:
        raise ModelError(f"--image-size must be a multiple of 32, got {image_size}")
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes, image_size)
