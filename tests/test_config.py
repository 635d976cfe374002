"""One typed config per verb: flags, help, YAML and Serve arguments all come from the pydantic
models, and every bad value fails before Ray starts, in one line naming the flag or the key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from raydeeplab.cli import build_parser, config_from_args
from raydeeplab.config import (
    MAX_PIXELS,
    ConfigError,
    CreateModelConfig,
    EvaluateConfig,
    PredictConfig,
    QuickstartConfig,
    ServeCommand,
    ServeConfig,
    TrainConfig,
    load_config,
)
from raydeeplab.data import images
from tests.test_cli import SCRIPT

REPO = Path(__file__).resolve().parents[1]
VERBS = {
    ("predict",): PredictConfig, ("train",): TrainConfig, ("evaluate",): EvaluateConfig,
    ("serve",): ServeCommand, ("model", "create"): CreateModelConfig, ("quickstart",): QuickstartConfig,
}  # fmt: skip


def help_flags(verb: tuple[str, ...]) -> dict[str, str]:
    """``--flag`` -> its help text, read from the verb's parser as ``--help`` prints it."""
    parser = build_parser()
    for word in verb:
        parser = next(a for a in parser._actions if a.dest in ("verb", "action")).choices[word]
    return {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings[-1].startswith("--")}


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_each_field_is_a_flag_with_its_description_and_default(verb):
    cls = VERBS[verb]
    flags = help_flags(verb)
    for name, field in cls.model_fields.items():
        option = "--" + name.replace("_", "-")
        if name in ("autoscaling_config", "keras_backend"):  # Serve arguments only (YAML / k8s)
            assert option not in flags
            continue
        assert flags[option].startswith(field.description), (option, flags[option])
        if field.default is not None and not field.is_required() and field.default_factory is None:
            assert f"(default: {field.default})" in flags[option]
    assert set(flags) - {"--help", "--verbose", "--config"} == {
        "--" + n.replace("_", "-") for n in cls.model_fields if n not in ("autoscaling_config", "keras_backend")
    }


def test_literal_fields_become_choices_and_typed_flags_are_parsed():
    args = build_parser().parse_args(["train", "--data", "d", "--output", "o", "--layout", "voc", "--min-scale", "0.75"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.layout, cfg.min_scale) == ("voc", 0.75)
    with pytest.raises(SystemExit):  # argparse: not one of the Literal's values
        build_parser().parse_args(["train", "--layout", "coco"])


def test_flags_override_yaml_and_errors_name_the_flag_or_the_key_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text("data: d\noutput: o\nbatch_size: 8\nepochs: 2\nworkers: 2\n")
    cfg = load_config(TrainConfig, "run.yaml", {"epochs": 5, "batch_size": None})
    assert (cfg.epochs, cfg.batch_size, cfg.data) == (5, 8, str(tmp_path / "d"))  # None: flag not given

    Path("bad.yaml").write_text("data: d\noutput: o\nimage_size: 100\n")
    with pytest.raises(ConfigError, match=r"^--config bad.yaml: image_size must be a multiple of 32, got 100$"):
        load_config(TrainConfig, "bad.yaml", {})
    with pytest.raises(ConfigError, match=r"^--image-size must be >= 32, got 0$"):
        load_config(TrainConfig, "bad.yaml", {"image_size": 0})  # the flag given wins, and is named
    with pytest.raises(ConfigError, match=r"--batch-size 8 must be a multiple of --workers 3"):
        load_config(TrainConfig, "run.yaml", {"workers": 3})  # cross-field: names both flags
    with pytest.raises(ConfigError, match=r"--min-scale/--max-scale must satisfy min <= max, got 2.0, 1.0"):
        TrainConfig(data="d", output="o", min_scale=2.0, max_scale=1.0)
    Path("typo.yaml").write_text("data: d\noutput: o\nepoch: 2\n")
    with pytest.raises(ConfigError, match=r"^--config typo.yaml: unknown key\(s\) epoch; did you mean epochs\?"):
        load_config(TrainConfig, "typo.yaml", {})
    with pytest.raises(ConfigError, match=r"^missing --input, --output \(from flags\)$"):
        load_config(PredictConfig, None, {"model": "tiny"})


def test_configs_are_frozen_and_round_trip_through_a_dict():
    cfg = TrainConfig(data="d", output="o", workers=2, batch_size=4)
    with pytest.raises(ValueError):
        cfg.epochs = 3
    assert TrainConfig.from_dict(cfg.model_dump()) == cfg  # what Ray Train's workers rebuild
    assert cfg.given("workers") == 2 and cfg.given("num_classes") is None


def test_serve_flags_become_the_builders_arguments_and_the_checked_in_ones_validate():
    cmd = ServeCommand(model="m", replicas=2, max_replicas=4, max_batch_size=4, auth_token_env="TOKEN")
    args = cmd.app_args(cluster_gpus=0)
    assert args == {
        "model": "m", "max_batch_size": 4, "auth_token_env": "TOKEN", "gpus_per_replica": 0.0,
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 4},
    }  # fmt: skip
    assert ServeConfig.from_dict(args).knobs().model_dump() == {"model": "m", "max_batch_size": 4, "batch_wait_timeout_s": 0.01}
    with pytest.raises(ConfigError, match=r"--max-replicas must be >= --replicas \(2\), got 1"):
        ServeCommand(model="m", replicas=2, max_replicas=1)
    (application,) = yaml.safe_load((REPO / "configs/serve_config.yaml").read_text())["applications"]
    assert ServeConfig.from_dict(application["args"]).gpus_per_replica == 1
    with pytest.raises(ConfigError, match=r"^serve arguments: max_batch_size must be >= 1, got 0$"):
        ServeConfig.from_dict({"max_batch_size": 0})


def test_each_checked_in_yaml_is_a_valid_config():
    for name, cls in (("voc_r50.yaml", TrainConfig), ("smoke.yaml", TrainConfig), ("batch_voc.yaml", PredictConfig)):
        extra = {"data": "d", "output": "o"} if name == "smoke.yaml" else {}
        assert isinstance(load_config(cls, str(REPO / "configs" / name), extra), cls)


def test_the_pixel_cap_has_one_value_for_the_decoder_and_predict():
    assert images.decode_image.__defaults__ == (MAX_PIXELS,)
    assert PredictConfig.model_fields["max_pixels"].default == MAX_PIXELS
    assert ServeConfig.model_fields["max_pixels"].default < MAX_PIXELS  # many requests decode at once


# ---------------------------------------------------------------- every check before Ray starts

UNREACHABLE = "127.0.0.1:1"  # a Ray address nothing listens on: reaching Ray would fail differently
CASES = {
    "predict": (["predict", "--input", "in", "--output", "out", "--model", "tiny", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    "train": (["train", "--data", "in", "--output", "out", "--batch-size", "3", "--workers", "2"], "--batch-size 3 must be a multiple of --workers 2"),
    "evaluate flag": (["evaluate", "--data", "in", "--model", "tiny", "--image-size", "50"], "--image-size must be a multiple of 32, got 50"),
    "evaluate data": (["evaluate", "--data", "nowhere", "--model", "tiny"], "--data {cwd}/nowhere: no such file or folder"),
    "serve": (["serve", "--model", "tiny", "--auth-token-env", "A", "--auth-token-file", "b"], "give auth_token_env or auth_token_file, not both"),
    "model create": (["model", "create", "--arch", "tiny", "--output", "p", "--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    "quickstart": (["quickstart", "--epochs", "0"], "--epochs must be >= 1, got 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_bad_value_fails_in_one_line_before_ray_starts(case, tmp_path):
    argv, words = CASES[case]
    (tmp_path / "in").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAYDEEPLAB_VERBOSE"}
    run = subprocess.run(
        [SCRIPT, "--address", UNREACHABLE, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"raydeeplab {argv[0]}: error: ") and words.format(cwd=tmp_path) in run.stderr, run.stderr


def test_a_relative_default_path_comes_out_absolute(tmp_path, monkeypatch):
    """quickstart's default output reached Ray Train's workers relative (they run elsewhere)."""
    from raydeeplab.config import QuickstartConfig, load_config

    monkeypatch.chdir(tmp_path)
    assert load_config(QuickstartConfig, None, {}).output == str(tmp_path / "quickstart_out")
