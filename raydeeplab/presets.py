"""Presets: a model as files. ``load_model(name | dir | s3://)``, ``save_model``, the local cache
of ``s3://`` presets, and what a preset says about itself without loading its weights.

A model is always a keras-hub *preset directory* (``save_to_preset`` / ``from_preset``),
so what ``model create`` writes, what training checkpoints and what ``predict`` and
``serve`` load are the same kind of thing. ``--model`` may be:

- an architecture name (``tiny``, ``deeplabv3plus_resnet50``, ``segformer_b0`` ...): random init, offline;
- a local preset directory;
- an ``s3://`` preset directory (copied once into a local cache);
- a keras-hub preset name (``deeplab_v3_plus_resnet50_pascalvoc``): downloaded by keras-hub, needs internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import keras
import keras_hub

from raydeeplab import storage
from raydeeplab.architectures import ARCHITECTURES, ModelError, build_model, default_image_size
from raydeeplab.data.images import VOC_CLASSES
from raydeeplab.errors import cause_text

SIDECAR = "raydeeplab.json"  # class names and input size, next to keras-hub's own files


def class_names(num_classes: int) -> list[str]:
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def save_model(model: keras_hub.models.ImageSegmenter, uri: str, **sidecar) -> None:
    """Save a loadable preset (local or ``s3://``) with a small JSON of our own beside it."""
    info = {
        "num_classes": model.num_classes,
        "image_size": input_size(model),
        "class_names": class_names(model.num_classes),
        **sidecar,
    }
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp, **sidecar)
            storage.upload_dir(tmp, uri)
        return
    converter = model.preprocessor.image_converter
    # One geometry everywhere (stretch): a fine-tuned hub preset may carry keras-hub's default
    # crop, and then keras-hub's own preprocessor would feed our checkpoint other pixels.
    converter.crop_to_aspect_ratio = converter.resizing.crop_to_aspect_ratio = False
    model.save_to_preset(uri)
    with open(os.path.join(uri, SIDECAR), "w") as f:
        json.dump(info, f, indent=2)


def create_model(arch: str, num_classes: int, image_size: int, output: str) -> None:
    """``raydeeplab model create``: a random-init preset anyone can load offline."""
    save_model(build_model(arch, num_classes, image_size), output, architecture=arch)


def input_size(model: keras_hub.models.ImageSegmenter) -> int:
    """The square size the model was made for (its image converter's), e.g. 512."""
    size = model.preprocessor.image_converter.image_size
    return int(size[0])


def check_model_spec(spec: str, backbone_ok: bool = False) -> None:
    """Cheap check, before any cluster work, that ``spec`` names something loadable.
    ``backbone_ok``: training also takes a backbone preset (no task.json) under a new head."""
    if spec in ARCHITECTURES:
        return
    if storage.is_remote(spec) or os.path.isdir(spec):
        with storage.reaching("--model", spec):
            check_preset_folder(spec, backbone_ok)
        return
    if spec in keras_hub.models.ImageSegmenter.presets:
        return
    raise ModelError(
        f"--model {spec!r} is not an architecture ({', '.join(ARCHITECTURES)}), "
        "a preset directory, an s3:// preset or a keras-hub segmenter preset"
    )


BACKBONE_FILES = ("config.json", "model.weights.h5")
PRESET_FILES = (*BACKBONE_FILES, "task.json", "image_converter.json")
RESAVE = "save it again (raydeeplab model create, or a training run's best/ folder) or copy it whole"


def check_preset_folder(spec: str, backbone_ok: bool = False) -> None:
    """Every file ``from_preset`` reads is there, and a local weights file opens (a copy cut
    short is an HDF5 file whose end is missing); reading the weights is left to the actors."""
    if not storage.exists(storage.join(spec, "config.json")):
        raise ModelError(f"--model {spec}: not a keras-hub preset (no config.json)")
    if storage.exists(storage.join(spec, "task.json")):
        task = read_preset_json(spec, "task.json", folder=True)
        segmenter = getattr(keras_hub.models, str(task.get("class_name")), None)
        if not (isinstance(segmenter, type) and issubclass(segmenter, keras_hub.models.ImageSegmenter)):
            raise ModelError(
                f"--model {spec}: a {task.get('class_name')} preset, not an image segmenter; "
                "pass a DeepLabV3 or SegFormer segmenter preset or an architecture name"
            )
    backbone = backbone_ok and not storage.exists(storage.join(spec, "task.json"))
    needed = BACKBONE_FILES if backbone else PRESET_FILES
    missing = [name for name in needed if not storage.exists(storage.join(spec, name))]
    if missing:
        raise ModelError(f"--model {spec}: incomplete preset, {', '.join(missing)} missing; {RESAVE}")
    if not storage.is_remote(spec):
        import h5py

        weights = os.path.join(spec, "model.weights.h5")
        try:
            h5py.File(weights, "r").close()
        except OSError as err:
            raise ModelError(f"--model {spec}: model.weights.h5 is unreadable or truncated ({err}); {RESAVE}") from err


@dataclass(frozen=True)
class ModelInfo:
    """What the CPU stages need to know about a model without building it."""

    num_classes: int
    image_size: int
    class_names: tuple[str, ...]


def describe_model(spec: str, num_classes: int = 21, image_size: int | None = None) -> ModelInfo:
    """Read class count and input size from a preset's JSON files (no weights are loaded)."""
    check_model_spec(spec)
    if spec in ARCHITECTURES:
        size = image_size or default_image_size(spec)
        return ModelInfo(num_classes, size, tuple(class_names(num_classes)))
    folder = storage.is_remote(spec) or os.path.isdir(spec)
    task = read_preset_json(spec, "task.json", folder)
    size = int(read_preset_json(spec, "image_converter.json", folder)["config"]["image_size"][0])
    names = class_names(task["config"]["num_classes"])
    if folder and storage.exists(storage.join(spec, SIDECAR)):
        names = read_preset_json(spec, SIDECAR, folder)["class_names"]
    return ModelInfo(task["config"]["num_classes"], size, tuple(names))


def check_sizes_agree(spec: str, info: ModelInfo, num_classes: int | None, image_size: int | None) -> None:
    """``--num-classes``/``--image-size`` the user gave (``None``: not given) must agree with a
    preset: they only size architectures, and would otherwise be ignored without a word."""
    if spec in ARCHITECTURES:
        return
    for name, given, own in (("num-classes", num_classes, info.num_classes), ("image-size", image_size, info.image_size)):
        if given is not None and given != own:
            raise ModelError(
                f"--{name} {given} disagrees with --model {spec}, which has {own}; drop --{name} "
                "(a preset carries its own) or fine-tune the preset with raydeeplab train"
            )


def read_preset_json(spec: str, name: str, folder: bool) -> dict:
    """One JSON file of a preset folder, or of a keras-hub preset (downloaded: needs internet)."""
    if folder:
        with storage.reaching("--model", spec):
            text = storage.read_bytes(storage.join(spec, name))
        try:
            return json.loads(text)
        except ValueError as err:
            raise ModelError(f"--model {spec}: {name} is not valid JSON, the preset is truncated ({err}); {RESAVE}") from err
    import kagglehub  # keras-hub's own downloader; every built-in preset is a Kaggle handle

    handle = keras_hub.models.ImageSegmenter.presets[spec]["kaggle_handle"].removeprefix("kaggle://")
    try:
        with open(kagglehub.model_download(handle, path=name), encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:  # requests' and kagglehub's errors are OSErrors
        raise ModelError(
            f"--model {spec}: cannot download this keras-hub preset ({cause_text(err)}); hub names need "
            "internet: on a machine without it, copy the preset folder here or to s3:// and pass its path"
        ) from err


def local_preset(spec: str, cache_dir: str | None = None) -> str:
    """A local directory or name that ``from_preset`` understands; remote presets are cached.

    The cache key is the URI and the ETags (else sizes and times) of its objects, so a preset
    overwritten in place (training refreshes ``best/``) is fetched again by a long-lived
    replica, at the cost of one LIST per load. A copy whose listing changed while it
    was downloading (a training run publishing) is thrown away and fetched again.
    """
    if not storage.is_remote(spec):
        return spec
    import shutil

    fs, path = storage.filesystem(spec)

    def version() -> str:
        files = fs.find(path, detail=True)
        if not files:
            raise ModelError(f"--model {spec}: no such preset (nothing under it)")
        stamps = {
            name: info.get("ETag") or f"{info.get('size')}@{info.get('LastModified', info.get('mtime'))}"
            for name, info in files.items()
        }
        return json.dumps(stamps, sort_keys=True)

    for _ in range(3):
        seen = version()
        key = hashlib.sha1(f"{storage.normalize(spec)}\n{seen}".encode()).hexdigest()[:16]
        local = os.path.join(cache_dir or storage.CACHE_ROOT, "presets", key)
        if os.path.exists(local):
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        storage.download_dir(spec, local)
        if version() == seen:
            return local
        shutil.rmtree(local, ignore_errors=True)
    raise ModelError(f"--model {spec} changed during each of 3 downloads; retry once it is written")


def load_model(
    spec: str,
    num_classes: int = 21,
    image_size: int | None = None,
    dtype: str | None = None,
    cache_dir: str | None = None,  # default: storage.CACHE_ROOT
) -> keras_hub.models.ImageSegmenter:
    """Any ``--model`` value -> segmenter. ``num_classes``/``image_size`` only apply to architectures."""
    check_model_spec(spec)
    if spec in ARCHITECTURES:
        keras.utils.set_random_seed(0)  # every actor must build the same random weights
        model = build_model(spec, num_classes, image_size or default_image_size(spec))
    else:
        with storage.reaching("--model", spec):
            folder = local_preset(spec, cache_dir)
        try:
            model = keras_hub.models.ImageSegmenter.from_preset(folder)
        except (OSError, ValueError) as err:  # an h5 cut short; weights of another architecture or size
            raise ModelError(f"--model {spec}: cannot load the preset ({cause_text(err)}); {RESAVE}") from err
    return model if dtype is None else with_dtype(model, dtype)


def with_dtype(model: keras.Model, dtype: str) -> keras.Model:
    """``model`` rebuilt with every layer under the ``dtype`` policy, same weights.

    ``from_preset(..., dtype=)`` is not enough: it sets the outer model's policy, while the layers
    keras-hub's backbones create and the nested image encoder keep the float32 they were saved
    with, so a "bfloat16" model silently computed in float32 (2x the memory and time on a GPU).
    """
    def retag(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy":
                return {**node, "config": {**node["config"], "name": dtype}}
            return {key: retag(value) for key, value in node.items()}
        return [retag(value) for value in node] if isinstance(node, list) else node

    config = retag(keras.saving.serialize_keras_object(model))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)  # layers built inside a backbone's __init__ take the global policy
    try:
        rebuilt = keras.saving.deserialize_keras_object(config)
    finally:
        keras.config.set_dtype_policy(previous)
    rebuilt.set_weights(model.get_weights())
    return rebuilt
