"""`ray job submit` against a real local cluster (`ray start --head` with the dashboard), as a user
would run it: the repo as working dir, settings in a runtime_env, status through the job API.
Also scrapes the node's Prometheus endpoint for the application metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from raydeeplab import storage
from raydeeplab.data import synthetic
from tests.corpus import write_corpus
from tests.s3_server import free_port
from tests.test_batch import read_rows, write_photos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The `ray` CLI installed beside this interpreter, whatever PATH says.
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


@pytest.fixture(scope="module")
def cluster(moto_s3, tmp_path_factory):
    """A head node in its own process group (so teardown never touches other Ray instances),
    declaring 2 CPUs: no bigger than the 2-core machine the tests run on."""
    # Every port explicit: another Ray instance on this machine (the in-process test cluster)
    # already holds the defaults, and a clash silently leaves the job agent down.
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics", "agent", "agent_grpc", "runtime_env")}
    temp = tmp_path_factory.mktemp("ray")
    # Token auth as Ray 2.60 ships it: the head and every client (CLI, SDK) use ~/.ray/auth_token.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={ports['gcs']}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent']}",
         f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{ports['dashboard']}"
    from ray.job_submission import JobSubmissionClient

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:
                assert head.poll() is None and time.monotonic() < deadline, "the head node did not come up"
                time.sleep(1)
        yield {"address": address, "client": client, "metrics": ports["metrics"], "gcs": f"127.0.0.1:{ports['gcs']}"}
    finally:
        os.killpg(head.pid, 9)
        head.wait()
        monkeypatch.undo()


def submit(cluster, *entrypoint: str, working_dir: str = REPO) -> str:
    """`ray job submit --no-wait` (the repo as working dir by default); returns the job id."""
    runtime_env = {
        "env_vars": {
            k: os.environ[k]
            for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        }
    }
    command = [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", working_dir, "--no-wait",
               "--runtime-env-json", json.dumps(runtime_env), "--", "python", *entrypoint]  # fmt: skip
    for _ in range(30):  # the head's job agent comes up a few seconds after the dashboard
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if "No available agent" not in out.stderr:
            break
        time.sleep(1)
    assert out.returncode == 0, out.stderr
    match = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return match.group(0)


def wait(cluster, job_id: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := cluster["client"].get_job_status(job_id)) not in (
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED,
    ):  # fmt: skip
        assert time.monotonic() < deadline, f"{job_id} still {status} after {timeout}s"
        time.sleep(1)
    return str(status.value)


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """Prometheus text -> [(name, labels, value)] for our metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = re.fullmatch(r"(ray_raydeeplab_\w+)(?:\{(.*)\})? (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric(samples: list[tuple[str, dict, float]], name: str, **labels: str) -> float:
    """Sum of a metric over all label sets matching ``labels``."""
    return sum(
        value for n, have, value in samples
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )  # fmt: skip


def test_batch_job_over_a_bucket_succeeds_and_metrics_count_what_it_did(cluster, bucket):
    write_photos(f"{bucket}/in", 5)
    expectations = write_corpus(f"{bucket}/in/corpus")
    job = submit(cluster, "jobs/batch_infer.py", "--input", f"{bucket}/in", "--output", f"{bucket}/out",
                 "--model", "tiny", "--image-size", "64", "--batch-size", "4", "--max-pixels", "10000000")  # fmt: skip
    assert wait(cluster, job) == "SUCCEEDED", cluster["client"].get_job_logs(job)

    rows = read_rows(f"{bucket}/out")
    ok = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    assert len(rows) == 5 + len(expectations)
    assert len(failed) == sum(isinstance(e, str) for e in expectations.values())
    assert "raydeeplab predict:" in cluster["client"].get_job_logs(job)

    deadline = time.monotonic() + 60
    while True:  # metrics are pushed every second; wait until they have all arrived
        samples = scrape(cluster["metrics"])
        done = metric(samples, "ray_raydeeplab_images_processed_total") == len(ok)
        if done and metric(samples, "ray_raydeeplab_images_failed_total") == len(failed):
            break
        assert time.monotonic() < deadline, samples
        time.sleep(1)
    assert metric(samples, "ray_raydeeplab_images_failed_total", reason="corrupt image") == 1
    written = sum(len(storage.read_bytes(r["mask_path"])) for r in ok)
    assert metric(samples, "ray_raydeeplab_bytes_written_total") >= written  # masks + Parquet parts
    assert metric(samples, "ray_raydeeplab_batch_latency_seconds_count") >= 1


def test_training_job_from_the_smoke_config_succeeds(cluster, tmp_path):
    synthetic.make_shapes_dataset(str(tmp_path / "shapes"), 16, size=(48, 64), num_classes=4)
    job = submit(cluster, "jobs/train.py", "--config", "configs/smoke.yaml", "--data", str(tmp_path / "shapes"),
                 "--output", str(tmp_path / "run"), "--epochs", "1", "--gallery", "1")  # fmt: skip
    assert wait(cluster, job) == "SUCCEEDED", cluster["client"].get_job_logs(job)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and 0.0 <= metrics["history"][0]["mean_iou"] <= 1.0
    assert (tmp_path / "run" / "best" / "config.json").exists()
    samples = scrape(cluster["metrics"])
    assert metric(samples, "ray_raydeeplab_train_step_seconds_count") >= 1


def test_a_failing_job_ends_failed_with_its_error_in_the_logs(cluster, tmp_path):
    write_photos(str(tmp_path / "in"), 1)  # an input to segment: the model is what fails
    job = submit(cluster, "jobs/batch_infer.py", "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--model", "no_such_model")  # fmt: skip
    assert wait(cluster, job, timeout=120) == "FAILED"
    assert "--model 'no_such_model' is not" in cluster["client"].get_job_logs(job)


def test_training_that_cannot_fit_the_cluster_fails_at_once_saying_what_is_missing(cluster, tmp_path):
    """2 workers of 1 CPU on a 2-CPU cluster leave nothing for data loading: Ray Train used to
    wait forever (``backpressured``); the CLI must say so before any worker starts."""
    synthetic.make_shapes_dataset(str(tmp_path / "shapes"), 8, size=(48, 64), num_classes=4)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "raydeeplab.cli", "--address", cluster["gcs"], "train", "--data", "shapes",
         "--output", "run", "--model", "tiny", "--num-classes", "4", "--image-size", "64", "--batch-size", "4",
         "--workers", "2", "--cpus-per-worker", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--workers 2 need 1 CPU each on one node, plus 1 CPU for data loading" in out.stderr
    assert "the cluster's nodes have 2 CPU" in out.stderr and "no CPU left for data loading" in out.stderr
    assert time.monotonic() - started < 120


def test_relative_paths_in_a_submitted_job_mean_the_jobs_working_dir(cluster, tmp_path):
    """`ray job submit --working-dir .` from a project folder: ./images is the uploaded copy."""
    project = tmp_path / "project"
    shutil.copytree(os.path.join(REPO, "jobs"), project / "jobs")
    write_photos(str(project / "images"), 3)
    job = submit(cluster, "jobs/batch_infer.py", "--input", "images", "--output", "out", "--model", "tiny",
                 "--image-size", "64", "--batch-size", "2", working_dir=str(project))  # fmt: skip
    assert wait(cluster, job) == "SUCCEEDED", cluster["client"].get_job_logs(job)
    logs = cluster["client"].get_job_logs(job)
    assert "raydeeplab predict: 3 ok, 0 failed" in logs, logs
    assert not (project / "out").exists()  # written in the job's own copy, not the submitter's folder
