"""Real services for the tests, started here: a moto S3 server and a local Ray cluster."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tests.s3_server import start_moto_server, stop_moto_server  # noqa: E402

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server subprocess on 127.0.0.1 (as s3fs's own suite does); yields its endpoint."""
    process, endpoint = start_moto_server()
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        stop_moto_server(process)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(moto_s3) -> str:
    """A fresh, empty bucket; returns ``s3://name``."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(moto_s3):
    """An in-process local Ray cluster whose workers see the S3 endpoint."""
    import ray

    env = {k: os.environ[k] for k in [*S3_ENV, "AWS_ENDPOINT_URL", "KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL"]}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-init DeepLabV3+ preset on disk (64 px, 5 classes), built offline. Seeded: some
    random inits predict one class on almost any input, which hides what tiling tests look for."""
    import keras

    from raydeeplab.presets import create_model

    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    create_model("tiny", num_classes=5, image_size=64, output=path)
    return path
