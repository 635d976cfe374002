"""Every failure a user can cause, through the CLI as a subprocess (issue 14): exit code 2 and
one line on stderr naming the verb, the flag or file at fault, the cause and what to do.

Each case fails before Ray starts (a few seconds each: the CLI's imports); the README's
Troubleshooting table lists the same rows. Ctrl-C, ``-v`` and a user error raised inside a
Ray worker have tests of their own below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.s3_server import HOST, free_port, start_moto_server, stop_moto_server
from tests.test_cli import SCRIPT

HUB_PRESET = "deeplab_v3_plus_resnet50_pascalvoc"
NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",  # else botocore asks the EC2 metadata service
}  # fmt: skip


def raydeeplab(cwd: Path, argv: list[str], env: dict[str, str | None] | None = None, **popen) -> subprocess.CompletedProcess:
    """The console script from ``cwd``; ``env`` overrides the environment (``None`` removes a variable)."""
    merged = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYDEEPLAB_VERBOSE")}
    for key, value in (env or {}).items():
        merged.pop(key, None) if value is None else merged.__setitem__(key, value)
    return subprocess.run([SCRIPT, *argv], cwd=cwd, env=merged, capture_output=True, text=True, timeout=300, **popen)


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.fixture(scope="module")
def guarded_s3():
    """A second moto server that checks credentials and IAM policies (the shared one accepts
    anything): bucket ``guarded`` with one image, a ``reader`` allowed only to read and a
    ``stranger`` allowed nothing on S3. Objects sit at the bucket's root: moto rejects the
    signature of a listing whose prefix holds a '/'."""
    import boto3

    process, endpoint = start_moto_server()
    admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="admin", aws_secret_access_key="admin")
    s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
    s3.create_bucket(Bucket="guarded")
    s3.put_object(Bucket="guarded", Key="a.png", Body=b"not read before the check fails")
    keys = {}
    for user, actions in (("reader", ["s3:GetObject", "s3:ListBucket"]), ("stranger", ["iam:GetUser"])):
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName="only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    # from now on every request is authenticated and authorised
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(reset).close()
    try:
        yield {"endpoint": endpoint, **keys}
    finally:
        stop_moto_server(process)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model, moto_s3) -> Path:
    """A working directory of relative paths: images, an empty folder, YAML files, broken presets."""
    cwd = tmp_path_factory.mktemp("errors")
    png(cwd / "images/a.png")
    (cwd / "empty").mkdir()
    (cwd / "notes.txt").write_text("a file, not a folder\n")
    job = "input: images\noutput: out\nmodel: tiny\n"
    (cwd / "syntax.yaml").write_text("input: [images\noutput: out\n")
    (cwd / "type.yaml").write_text(job + 'batch_size: "many"\n')
    (cwd / "range.yaml").write_text(job + "batch_size: 0\n")
    (cwd / "unknown.yaml").write_text(job + "batchsize: 4\n")
    shutil.copytree(tiny_model, cwd / "tiny5")
    shutil.copytree(tiny_model, cwd / "truncated")
    weights = cwd / "truncated/model.weights.h5"  # a copy cut short
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    classifier_preset(cwd / "classifier")
    from raydeeplab.presets import create_model

    create_model("tiny", num_classes=3, image_size=64, output=str(cwd / "tiny3"))
    shutil.copytree(tiny_model, cwd / "misfit")  # a 3-class head under a 5-class preset: only loading tells
    shutil.copy(cwd / "tiny3/task.weights.h5", cwd / "misfit/task.weights.h5")
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="photos")
    s3.put_object(Bucket="photos", Key="docs/readme.txt", Body=b"no images here")
    return cwd


def classifier_preset(path: Path) -> None:
    """A real keras-hub preset of another task: an image classifier on the tiny ResNet."""
    import keras_hub

    from raydeeplab.architectures import TINY_RESNET, build_resnet

    keras_hub.models.ResNetImageClassifier(backbone=build_resnet(TINY_RESNET), num_classes=3).save_to_preset(str(path))


@pytest.fixture(scope="module")
def read_only(workspace) -> str | None:
    """A folder nobody may write to, root included (tests often run as root, which ignores
    permission bits): the immutable attribute (``chattr +i``) as root, ``chmod 555`` otherwise."""
    folder = workspace / "read-only"
    folder.mkdir()
    lock, unlock = (["chattr", "+i"], ["chattr", "-i"]) if os.geteuid() == 0 else (["chmod", "555"], ["chmod", "755"])
    if subprocess.run([*lock, str(folder)], capture_output=True).returncode:
        yield None
        return
    yield folder.name
    subprocess.run([*unlock, str(folder)], check=True)


@pytest.fixture(scope="module")
def busy_port():
    """A port another server already listens on."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen()
        yield server.getsockname()[1]


PREDICT = ["predict", "--input", "images", "--output", "out", "--model"]
# id: (argv, environment overrides, words the one line must hold); {placeholders} come from fixtures
CASES = {
    "hub preset offline": (
        [*PREDICT, HUB_PRESET],
        {"HTTPS_PROXY": "http://127.0.0.1:{closed}", "HTTP_PROXY": "http://127.0.0.1:{closed}", "KAGGLEHUB_CACHE": "{cwd}/kaggle"},
        [f"--model {HUB_PRESET}", "cannot download", "need internet", "s3://"],
    ),
    "object store unreachable": (
        ["predict", "--input", "s3://photos/in", "--output", "out", "--model", "tiny"],
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed}"},
        ["--input s3://photos/in", "cannot reach the object store at http://127.0.0.1:", "check AWS_ENDPOINT_URL"],
    ),
    "missing credentials": (
        ["predict", "--input", "s3://guarded", "--output", "out", "--model", "tiny"],
        {"AWS_ENDPOINT_URL": "{guarded}", **NO_CREDENTIALS},
        ["--input s3://guarded", "no object-store credentials", "set AWS_ACCESS_KEY_ID"],
    ),
    "wrong credentials": (
        ["predict", "--input", "s3://guarded", "--output", "out", "--model", "tiny"],
        {"AWS_ENDPOINT_URL": "{guarded}", "AWS_ACCESS_KEY_ID": "AKIANOTAKEY", "AWS_SECRET_ACCESS_KEY": "wrong"},
        ["--input s3://guarded", "refused the credentials (InvalidAccessKeyId)", "check AWS_ACCESS_KEY_ID"],
    ),
    "no such bucket": (
        ["predict", "--input", "s3://no-such-bucket/photos", "--output", "out", "--model", "tiny"],
        {},
        ["--input s3://no-such-bucket/photos", "bucket 'no-such-bucket' does not exist", "check the bucket name"],
    ),
    "no such prefix": (
        ["predict", "--input", "s3://photos/nothing-here", "--output", "out", "--model", "tiny"],
        {},
        ["--input s3://photos/nothing-here", "no such file or folder", "check the path or prefix"],
    ),
    "access denied on read": (
        ["predict", "--input", "s3://guarded", "--output", "out", "--model", "tiny"],
        {"AWS_ENDPOINT_URL": "{guarded}", "AWS_ACCESS_KEY_ID": "{stranger_key}", "AWS_SECRET_ACCESS_KEY": "{stranger_secret}"},
        ["--input s3://guarded", "access denied on read", "need s3:GetObject"],
    ),
    "access denied on write": (
        ["predict", "--input", "images", "--output", "s3://guarded", "--model", "tiny"],
        {"AWS_ENDPOINT_URL": "{guarded}", "AWS_ACCESS_KEY_ID": "{reader_key}", "AWS_SECRET_ACCESS_KEY": "{reader_secret}"},
        ["--output s3://guarded", "access denied on write (AccessDenied)", "need s3:PutObject"],
    ),
    "output in a read-only folder": (
        ["predict", "--input", "images", "--output", "{read_only}/out", "--model", "tiny"],
        {},
        ["--output {cwd}/{read_only}/out", "cannot write here (PermissionError", "choose a folder you can write"],
    ),
    "output under a file": (
        ["predict", "--input", "images", "--output", "notes.txt/out", "--model", "tiny"],
        {},
        ["--output {cwd}/notes.txt/out", "part of the path is a file", "choose a folder"],
    ),
    "YAML syntax error": (
        ["predict", "--config", "syntax.yaml"],
        {},
        ["--config syntax.yaml", "YAML syntax error at line 2, column 7", "fix the file"],
    ),
    "YAML value of the wrong type": (
        ["predict", "--config", "type.yaml"],
        {},
        ["--config type.yaml", "batch_size must be a whole number (e.g. batch_size: 16), got 'many'"],
    ),
    "YAML value out of range": (
        ["predict", "--config", "range.yaml"],
        {},
        ["--config range.yaml: batch_size must be >= 1, got 0"],
    ),
    "unknown YAML key": (
        ["predict", "--config", "unknown.yaml"],
        {},
        ["--config unknown.yaml", "unknown key(s) batchsize", "did you mean batch_size?"],
    ),
    "empty input": (
        ["predict", "--input", "empty", "--output", "out", "--model", "tiny"],
        {},
        ["--input {cwd}/empty", "no images under it", "check the path or prefix"],
    ),
    "no images under the prefix": (
        ["predict", "--input", "s3://photos/docs", "--output", "out", "--model", "tiny"],
        {},
        ["--input s3://photos/docs", "no images under it"],
    ),
    "truncated preset": (
        [*PREDICT, "truncated"],
        {},
        ["--model {cwd}/truncated", "model.weights.h5 is unreadable or truncated", "save it again"],
    ),
    "preset of another architecture": (
        [*PREDICT, "classifier"],
        {},
        ["--model {cwd}/classifier", "a ResNetImageClassifier preset, not an image segmenter"],
    ),
    "--num-classes disagrees with the preset": (
        [*PREDICT, "tiny5", "--num-classes", "7"],
        {},
        ["--num-classes 7 disagrees with --model {cwd}/tiny5, which has 5", "drop --num-classes"],
    ),
    "preset whose head does not fit (found by the Ray actor loading it)": (
        [*PREDICT, "misfit"],
        {},
        ["--model {cwd}/misfit: cannot load the preset (ValueError:", "save it again", "raised in a Ray worker"],
    ),
    "model export to a read-only folder": (
        ["model", "export", "--model", "tiny5", "--format", "onnx", "--output", "{read_only}/onnx"],
        {},
        ["--output {cwd}/{read_only}/onnx", "cannot write here (PermissionError", "choose a folder you can write"],
    ),
    "model export --num-classes other than the preset's (it was ignored)": (
        ["model", "export", "--model", "tiny5", "--format", "saved_model", "--output", "exported", "--num-classes", "7"],
        {},
        ["--num-classes 7 disagrees with --model {cwd}/tiny5, which has 5", "drop --num-classes"],
    ),
    "model export of a preset that fails to load (found by the TensorFlow process)": (
        ["model", "export", "--model", "misfit", "--format", "saved_model", "--output", "exported"],
        {},
        ["--model {cwd}/misfit: cannot load the preset (ValueError:", "save it again"],
    ),
    "serve on a port in use": (
        ["serve", "--model", "tiny", "--port", "{busy_port}"],
        {},
        ["--port {busy_port} on 127.0.0.1: already in use", "pick another --port"],
    ),
    "serve on a host name that does not resolve (it blamed --port)": (
        ["serve", "--model", "tiny", "--host", "not-a-host.invalid"],
        {},
        ["--host not-a-host.invalid:", "give an address or name of this machine"],
    ),
    "serve with a token file that is not there (found by each replica, after Ray and Serve started)": (
        ["serve", "--model", "tiny", "--auth-token-file", "missing-token"],
        {},
        ["--auth-token-file {cwd}/missing-token: No such file or directory"],
    ),
    "an s3:// output without a bucket (it wrote to a local folder named s3:)": (
        [*PREDICT, "tiny", "--output", "s3://"],
        {},
        ["--output s3://: no bucket", "write s3://BUCKET"],
    ),
}


@pytest.fixture(scope="module")
def placeholders(workspace, guarded_s3, read_only, busy_port) -> dict:
    keys = {f"{user}_{part}": guarded_s3[user][f"AWS_{var}"] for user in ("reader", "stranger")
            for part, var in (("key", "ACCESS_KEY_ID"), ("secret", "SECRET_ACCESS_KEY"))}  # fmt: skip
    return {"cwd": workspace, "closed": free_port(), "guarded": guarded_s3["endpoint"], "read_only": read_only,
            "busy_port": busy_port, **keys}  # fmt: skip


RAY_NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \w+\.cc:\d+: ")


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_with_exit_code_2(case, workspace, placeholders):
    argv, env, words = CASES[case]
    if any("{read_only}" in a for a in argv) and placeholders["read_only"] is None:
        pytest.skip("this filesystem gives root no read-only folder (no immutable attribute)")
    fill = lambda text: text.format(**placeholders)  # noqa: E731
    run = raydeeplab(workspace, [fill(a) for a in argv], {k: v and fill(v) for k, v in env.items()})
    # Ray's C++ core worker writes one line of its own to the driver's stderr when Ray Data creates
    # an actor pool ("... core_worker.cc: Actor ... has constructor arguments in the object store"):
    # not ours to word, and not yet silenced (README: Troubleshooting); every other line counts
    lines = [line for line in run.stderr.splitlines() if not RAY_NATIVE_LOG.match(line)]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"raydeeplab {argv[0]}: error: "), lines
    for word in words:
        assert fill(word) in lines[0], lines[0]
    assert "Traceback" not in run.stdout


def test_verbose_shows_the_traceback_before_the_same_line(workspace):
    run = raydeeplab(workspace, ["predict", "--config", "type.yaml", "-v"])
    assert run.returncode == 2
    assert "Traceback (most recent call last)" in run.stderr
    assert run.stderr.splitlines()[-1].startswith("raydeeplab predict: error: --config type.yaml: batch_size must be")


def test_ctrl_c_during_a_verb_stops_cleanly_with_exit_code_130(workspace):
    for i in range(64):
        png(workspace / f"many/{i}.png")
    verb = subprocess.Popen(
        [SCRIPT, "predict", "--input", "many", "--output", "out_interrupted", "--model", "tiny"], cwd=workspace,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        while "Ray cluster with" not in (line := verb.stdout.readline()):  # Ray is up: the job is under way
            assert line, verb.stderr.read()
        verb.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert verb.wait(timeout=120) == 130
        stderr = verb.stderr.read()
        assert stderr.splitlines() == ["raydeeplab predict: interrupted (Ctrl-C); outputs written so far are kept"], stderr
    finally:
        if verb.poll() is None:
            os.killpg(verb.pid, signal.SIGKILL)
            verb.wait()
