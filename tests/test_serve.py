"""Online serving end to end: a real Serve app on 127.0.0.1, a real HTTP client, a tiny model."""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from raydeeplab.cli import add_config_flags, config_from_args
from raydeeplab.config import ConfigError, Knobs, ServeCommand, ServeConfig
from raydeeplab.data.images import (
    decode_image,
    decode_mask_png,
    encode_jpeg,
    encode_mask_png,
    overlay,
    resize_image,
    resize_mask,
)
from raydeeplab.cli import run_serve_verb
from raydeeplab.api import read_auth_token
from raydeeplab.serve import app_builder, device_batch_sizes
from tests.corpus import BOMB_LIMIT, corpus, png
from tests.padding import padded_reference
from tests.s3_server import free_port

MAX_BODY = 300_000
CONFIG = "configs/serve_config.yaml"


def blocky(seed: int, height: int, width: int) -> np.ndarray:
    """Coloured 8x8 blocks: a random-init model gives them masks with several classes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:height, :width]


def varied_images(count: int) -> list[bytes]:
    """Different sizes and contents, PNG and JPEG: each answer can only be its own."""
    images = []
    for i in range(count):
        array = blocky(i, 40 + 5 * i, 90 - 3 * i)
        images.append(png(array) if i % 2 else encode_jpeg(array))
    return images


@pytest.fixture(scope="module")
def http_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()  # Serve only: ray_local belongs to the session


@pytest.fixture(scope="module")
def base_args(tiny_model) -> dict:
    return {
        "model": tiny_model,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.1,  # long enough for 2 CI cores to gather concurrent requests
        "max_body_bytes": MAX_BODY,
        "max_pixels": BOMB_LIMIT,
    }


@pytest.fixture(scope="module")
def server(http_port, base_args) -> str:
    """The app without auth at /plain; yields its base URL."""
    from ray import serve

    serve.run(app_builder(base_args), name="plain", route_prefix="/plain")
    return f"http://127.0.0.1:{http_port}/plain"


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected_mask(tiny_model):
    """Reference: the batch pipeline's steps (decode, resize, Segmenter, resize back) in-process."""
    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import Segmenter

    segmenter = Segmenter(load_model(tiny_model), batch_size=1)

    def expected(data: bytes) -> np.ndarray:
        image = decode_image(data)
        mask = segmenter.predict(resize_image(image, segmenter.image_size)[None])[0]
        return resize_mask(mask, *image.shape[:2])

    return expected


def segment(client: httpx.Client, data: bytes, multipart: bool = True, **params) -> httpx.Response:
    if multipart:
        return client.post("/segment", params=params, files={"image": ("upload", data)})
    return client.post("/segment", params=params, content=data)


# ---------------------------------------------------------------- answers


def test_png_is_the_mask_batch_inference_writes(client, expected_mask):
    good = {name: data for name, (data, shape) in corpus().items() if isinstance(shape, tuple)}
    for name, data in {**good, "blocky.png": varied_images(2)[1]}.items():
        expected = expected_mask(data)
        for multipart in (True, False):
            response = segment(client, data, multipart)
            assert response.status_code == 200, (name, response.text)
            assert response.headers["content-type"] == "image/png"
            # Byte for byte what batch.write_outputs writes: same mask, same encoder.
            assert response.content == encode_mask_png(expected), name
            assert decode_mask_png(response.content).shape == decode_image(data).shape[:2]


def test_json_counts_are_the_png_histogram_and_rle_restores_the_mask(client, expected_mask, tiny_model):
    data = varied_images(3)[2]
    mask = decode_mask_png(segment(client, data).content)
    answer = segment(client, data, format="json", rle="true").json()

    assert (answer["height"], answer["width"]) == mask.shape
    assert answer["model"] == tiny_model
    assert answer["class_pixel_counts"] == np.bincount(mask.ravel(), minlength=5).tolist()
    assert list(answer["class_areas"]) == [f"class_{i}" for i in range(5)]
    assert sum(answer["class_areas"].values()) == pytest.approx(1.0)
    assert 1 / 5 <= answer["confidence"] <= 1  # a mean top-class probability over 5 classes
    rle = answer["rle"]
    restored = np.repeat(rle["values"], rle["lengths"]).reshape(mask.shape)
    np.testing.assert_array_equal(restored, expected_mask(data))
    assert "rle" not in segment(client, data, format="json").json()


def test_pad_policy_answers_numpys_own_pad_cropped_back(http_port, base_args, tiny_model):
    """``resize: pad``: a non-square image's mask and confidence are the Segmenter's on the image
    padded by numpy, cropped back (tests/padding.py), for wide and tall images alike."""
    from ray import serve

    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import Segmenter

    serve.run(app_builder({**base_args, "max_batch_size": 1, "resize": "pad"}), name="pad", route_prefix="/pad")
    segmenter = Segmenter(load_model(tiny_model), batch_size=1)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}/pad", timeout=60) as c:
            for image in (blocky(7, 30, 100), blocky(8, 90, 41)):
                mask, confidence = padded_reference(segmenter, image)
                assert segment(c, png(image)).content == encode_mask_png(mask)
                answer = segment(c, png(image), format="json", rle="true").json()
                restored = np.repeat(answer["rle"]["values"], answer["rle"]["lengths"]).reshape(image.shape[:2])
                np.testing.assert_array_equal(restored, mask)
                assert answer["confidence"] == pytest.approx(confidence, abs=1e-6)
                stretched = resize_mask(segmenter.predict(resize_image(image, 64)[None])[0], *image.shape[:2])
                assert (stretched != mask).any()  # the policies differ on this image: the test can fail
    finally:
        serve.delete("pad")


def test_overlay_is_the_image_with_the_mask_blended_in(client, expected_mask):
    data = varied_images(5)[4]
    response = segment(client, data, format="overlay")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(response.content)))
    np.testing.assert_array_equal(picture, overlay(decode_image(data), expected_mask(data)))


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_mask(client, expected_mask):
    images = varied_images(12)
    bad = [b"", b"not an image at all" * 5, corpus()["truncated.jpg"][0], b"\x89PNG\r\n\x1a\n broken"]
    jobs = [(data, True) for data in images] + [(data, False) for data in bad]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: segment(client, job[0]), jobs))

    batch_sizes = []
    for (data, good), response in zip(jobs, responses):
        if not good:  # refused before batching, so it failed no one else's batch
            assert response.status_code == 400, response.text
            continue
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(decode_mask_png(response.content), expected_mask(data))
        batch_sizes.append(int(response.headers["X-Batch-Size"]))
    assert max(batch_sizes) > 1, batch_sizes
    recent = client.get("/stats").json()["recent_batch_sizes"]
    assert max(recent) > 1 and max(recent) <= 8, recent


# ---------------------------------------------------------------- refusals


def test_every_bad_input_gets_its_status_and_the_server_keeps_answering(client, expected_mask):
    files = corpus()
    cases = [
        ("empty body", b"", {}, 400, "empty file"),
        ("garbage bytes", files["not_an_image.png"][0], {}, 400, "not an image"),
        ("truncated JPEG", files["truncated.jpg"][0], {}, 400, "corrupt image"),
        ("too many pixels", files["bomb.png"][0], {}, 400, "too many pixels"),
        ("oversize body", bytes(MAX_BODY + 1), {}, 413, "limit"),
        ("bad format", files["ok.jpg"][0], {"format": "gif"}, 400, "format must be one of"),
    ]
    for name, data, params, status, reason in cases:
        for multipart in (True, False):
            response = segment(client, data, multipart, **params)
            assert response.status_code == status, (name, multipart, response.text)
            assert reason in response.json()["detail"], (name, response.text)

    chunked = client.post("/segment", content=iter([bytes(100_000)] * 4))  # no Content-Length
    assert chunked.status_code == 413, chunked.text
    wrong_field = client.post("/segment", files={"photo": ("x.jpg", files["ok.jpg"][0])})
    assert wrong_field.status_code == 400 and "'image' is nothing" in wrong_field.json()["detail"]
    as_text = client.post("/segment", data={"image": "not a file"}, files={"note": ("n.txt", b"x")})  # curl -F 'image=<cat.jpg'
    assert as_text.status_code == 400 and "a text field" in as_text.json()["detail"], as_text.text
    assert "-F image=@cat.jpg" in as_text.json()["detail"]

    data = files["ok.jpg"][0]
    after = segment(client, data)
    assert after.status_code == 200
    assert after.content == encode_mask_png(expected_mask(data))


def test_health_model_and_docs_endpoints(client, tiny_model):
    assert client.get("/healthz").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["id"] == tiny_model
    assert (model["num_classes"], model["input_size"]) == (5, 64)
    assert model["class_names"] == [f"class_{i}" for i in range(5)]
    assert model["device_batch_sizes"] == [1, 2, 4, 8]
    assert model["keras_backend"] == "jax"
    assert client.get("/docs").status_code == 200
    assert "/segment" in client.get("/openapi.json").json()["paths"]


def test_user_config_swaps_model_and_batching_on_the_live_replica(client, base_args, tmp_path):
    """What a `serve deploy` of a changed user_config does: reconfigure() on the same replica."""
    from ray import serve

    from raydeeplab.presets import create_model

    other = str(tmp_path / "three_classes")
    create_model("tiny", num_classes=3, image_size=64, output=other)
    handle = serve.get_app_handle("plain")
    replica = client.get("/stats").json()["replica"]
    knobs = Knobs(model=base_args["model"], max_batch_size=8, batch_wait_timeout_s=0.1)
    try:
        swapped = {"model": other, "max_batch_size": 1, "batch_wait_timeout_s": 0.1}
        handle.reconfigure.remote(swapped).result()
        model = client.get("/model").json()
        assert (model["id"], model["num_classes"], model["device_batch_sizes"]) == (other, 3, [1])

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda d: segment(client, d, format="json"), varied_images(6)))
        assert [a.json()["batch_size"] for a in answers] == [1] * 6  # batching off
        assert all(len(a.json()["class_pixel_counts"]) == 3 for a in answers)
        assert client.get("/stats").json()["replica"] == replica  # no restart

        # Serve replaces the whole dict: a key left out is the application's own (it failed:
        # "missing --model")
        handle.reconfigure.remote({"max_batch_size": 2}).result()
        model = client.get("/model").json()
        assert (model["id"], model["device_batch_sizes"]) == (base_args["model"], [1, 2])
    finally:
        handle.reconfigure.remote(knobs.model_dump()).result()
    assert client.get("/model").json()["id"] == base_args["model"]


# ---------------------------------------------------------------- `raydeeplab serve`, auth


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address")  # cli.py's global flag
    add_config_flags(parser, ServeCommand)
    return parser


def test_cli_serves_with_a_bearer_token_until_interrupted(http_port, tiny_model, tmp_path, monkeypatch):
    from ray import serve

    import raydeeplab.cli

    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    args = serve_parser().parse_args(
        ["--model", tiny_model, "--host", "127.0.0.1", "--port", str(http_port),
         "--max-batch-size", "2", "--auth-token-file", str(secret)]
    )  # fmt: skip
    data = corpus()["ok.jpg"][0]
    seen = {}

    def while_serving() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
            seen["healthz"] = c.get("/healthz").status_code
            seen["no token"] = segment(c, data).status_code
            seen["no token, /model"] = c.get("/model").status_code
            c.headers["Authorization"] = "Bearer wrong"
            seen["wrong token"] = segment(c, data).status_code
            c.headers["Authorization"] = "Bearer s3cret-token"
            seen["token"] = segment(c, data).status_code
            seen["token, /model"] = c.get("/model").json()["max_batch_size"]
        # returning is what Ctrl-C does: wait_until_interrupted catches it (and SIGTERM) itself

    monkeypatch.setattr(raydeeplab.cli, "wait_until_interrupted", while_serving)
    assert run_serve_verb(args) == 0
    assert seen == {
        "healthz": 200, "no token": 401, "no token, /model": 401,
        "wrong token": 401, "token": 200, "token, /model": 2,
    }  # fmt: skip
    assert "raydeeplab" not in serve.status().applications  # Ctrl-C took the app down


# ---------------------------------------------------------------- arguments and config (no Ray)


def test_unknown_or_conflicting_arguments_fail_with_the_key():
    with pytest.raises(ConfigError, match="max_batch"):
        app_builder({"model": "tiny", "max_batch": 4})
    with pytest.raises(ConfigError, match="not both"):
        app_builder({"auth_token_env": "A", "auth_token_file": "/b"})
    with pytest.raises(ConfigError, match="not both"):
        app_builder({"replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}})
    with pytest.raises(ConfigError, match="max_batch_size"):
        app_builder({"max_batch_size": 0})
    with pytest.raises(ConfigError, match="image_size"):
        ServeConfig.from_dict({"image_size": 100})
    with pytest.raises(ValueError, match="batch_size"):  # what reconfigure() does with user_config
        Knobs.model_validate({"model": "tiny", "batch_size": 4})


def test_max_replicas_and_an_autoscaling_config_are_not_both_taken(tmp_path):
    from raydeeplab.config import load_config

    (tmp_path / "serve.yaml").write_text("model: tiny\nautoscaling_config: {min_replicas: 1, max_replicas: 3}\n")
    with pytest.raises(ConfigError, match="--max-replicas and autoscaling_config both set autoscaling"):
        load_config(ServeCommand, str(tmp_path / "serve.yaml"), {"max_replicas": 4})


def test_flags_become_builder_arguments_with_autoscaling():
    args = serve_parser().parse_args(
        ["--model", "tiny", "--replicas", "2", "--max-replicas", "6", "--max-batch-size", "4"]
    )
    values = config_from_args(ServeCommand, args).app_args(cluster_gpus=8)
    assert values["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 4}
    assert values["gpus_per_replica"] == 1.0 and "replicas" not in values
    assert ServeConfig.from_dict(values).max_batch_size == 4
    both = serve_parser().parse_args(["--model", "tiny", "--auth-token-env", "A", "--auth-token-file", "b"])
    with pytest.raises(ConfigError, match="not both"):  # one token source only
        config_from_args(ServeCommand, both)


def test_auth_token_comes_from_an_env_var_or_a_file(tmp_path, monkeypatch):
    assert read_auth_token(None, None) is None
    monkeypatch.setenv("RAYDEEPLAB_TEST_TOKEN", " abc \n")
    assert read_auth_token("RAYDEEPLAB_TEST_TOKEN", None) == "abc"
    with pytest.raises(ConfigError, match="RAYDEEPLAB_MISSING"):
        read_auth_token("RAYDEEPLAB_MISSING", None)
    (tmp_path / "token").write_text("xyz\n")
    assert read_auth_token(None, str(tmp_path / "token")) == "xyz"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_auth_token(None, str(tmp_path / "empty"))


def test_device_batch_shapes_are_powers_of_two_up_to_the_max():
    assert device_batch_sizes(1) == [1]
    assert device_batch_sizes(8) == [1, 2, 4, 8]
    assert device_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_checked_in_serve_config_deploys_the_builder_with_valid_args():
    """configs/serve_config.yaml (k8s/rayservice.yaml's serveConfigV2): args only a builder takes."""
    from ray.serve.schema import ServeDeploySchema

    with open(CONFIG) as f:
        config = yaml.safe_load(f)
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "raydeeplab.serve:app_builder"
    assert "deployments" not in application, "options come from args, through app_builder, only"
    args = ServeConfig.from_dict(application["args"])
    assert args.model.startswith("s3://") and args.auth_token_file and args.gpus_per_replica == 1
    app_builder(application["args"])  # what Serve calls with them


def test_cli_help_imports_neither_serve_nor_frameworks():
    """`raydeeplab --help` stays fast: the parser needs only the argument models."""
    code = (
        "import sys; from raydeeplab.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('ray.serve', 'fastapi', 'keras', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_http_surface_imports_no_ray():
    """raydeeplab.api is core: the Serve deployment is the only Ray in serving."""
    code = "import sys, raydeeplab.api; print(sorted(m for m in ('ray', 'ray.serve') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_s3_preset_overwritten_in_place_is_loaded_fresh(bucket, tmp_path):
    """A long-lived replica reloading `best/` after training overwrote it gets the new model."""
    from raydeeplab import storage
    from raydeeplab.presets import create_model, load_model, local_preset

    for classes in (3, 4):
        create_model("tiny", num_classes=classes, image_size=64, output=str(tmp_path / f"classes{classes}"))
    best, cache = f"{bucket}/runs/voc/best", str(tmp_path / "cache")
    storage.upload_dir(str(tmp_path / "classes3"), best)
    first = local_preset(best, cache)
    assert local_preset(best, cache) == first  # unchanged: the cached copy, no download
    assert load_model(best, cache_dir=cache).num_classes == 3

    storage.upload_dir(str(tmp_path / "classes4"), best)  # training publishes in place
    assert local_preset(best, cache) != first
    assert load_model(best, cache_dir=cache).num_classes == 4
