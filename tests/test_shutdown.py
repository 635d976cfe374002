"""Clean shutdown (issue 12, item 8): the CLI stopped with SIGTERM, what Kubernetes and process
managers send. ``serve`` drains its in-flight requests and exits 0 with its port free; ``predict``
stops its Ray work, exits 143 and leaves only whole files, and a rerun does the rest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import pyarrow.parquet as pq
from PIL import Image

from raydeeplab.data.images import decode_mask_png
from tests.corpus import png
from tests.test_cli import SCRIPT
from tests.test_security import cli_env, kill_run, marked_pids, own_ray_env, short_tmp

K8S_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds: SIGKILL follows after it
DRAIN_S = 10  # the server's --graceful-shutdown-timeout-s
SLOW_S = 4  # a lone request waits this long for its batch to fill (--batch-wait-timeout-s)
READY = "Ctrl-C stops"  # in the line `raydeeplab serve` prints once it answers


def photo(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


class Server:
    """``raydeeplab serve --model tiny`` as a subprocess in ``cwd`` with its own Ray (found and
    ended by pid afterwards); stdout and stderr go to files, read back by the tests."""

    def __init__(self, cwd: Path, *flags: str, startup_s: float = 300):
        self.port = free_port()
        self.ray_tmp = short_tmp()
        self.stdout, self.stderr = cwd / "serve.out", cwd / "serve.err"
        self.process = subprocess.Popen(
            [SCRIPT, "serve", "--model", "tiny", "--num-classes", "5", "--image-size", "64",
             "--port", str(self.port), *flags],
            cwd=cwd, env=own_ray_env(self.ray_tmp), stdout=self.stdout.open("w"), stderr=self.stderr.open("w"),
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + startup_s
        while READY not in self.stdout.read_text():
            assert self.process.poll() is None, self.stdout.read_text() + self.stderr.read_text()
            assert time.monotonic() < deadline, f"not serving after {startup_s} s"
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """SIGKILL whatever is left of the CLI and its Ray (by pid; nothing else is touched)."""
        kill_run(self.process, self.ray_tmp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.large  # a CLI run with its own Ray, stopped: minutes on 2 cores (pytest -m large)
def test_sigterm_drains_in_flight_requests_then_serve_exits_0(tmp_path):
    server = Server(
        tmp_path, "--max-batch-size", "4", "--batch-wait-timeout-s", str(SLOW_S),
        "--graceful-shutdown-timeout-s", str(DRAIN_S),
    )  # fmt: skip
    try:
        image = photo(0, 48, 80)
        answers: list[httpx.Response] = []
        answered = float("nan")

        def send() -> None:
            nonlocal answered
            answers.append(httpx.post(f"{server.url}/segment", files={"image": ("a.png", png(image))}, timeout=120))
            answered = time.monotonic()

        slow = threading.Thread(target=send)
        sent = time.monotonic()
        slow.start()
        while httpx.get(f"{server.url}/stats", timeout=30).json()["requests"] < 1:  # in the replica's batch
            assert time.monotonic() - sent < 60, "the request never reached the replica"
            time.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code = server.process.wait(timeout=K8S_GRACE_S + 30)
        exit_s = time.monotonic() - stopped
        slow.join(timeout=60)
        stderr = server.stderr.read_text()
        print(f"\nSIGTERM {stopped - sent:.1f} s after the request was sent -> exit {code} in {exit_s:.1f} s; "
              f"the request answered {answers[0].status_code if answers else None} {answered - sent:.1f} s after it was sent")  # fmt: skip

        assert answers and answers[0].status_code == 200, answers and answers[0].text
        assert decode_mask_png(answers[0].content).shape == (48, 80)
        assert code == 0, stderr
        assert exit_s < K8S_GRACE_S, f"took {exit_s:.1f} s to exit; Kubernetes would have killed it"
        assert "Aborted" not in stderr and "Traceback" not in stderr, stderr
        assert "stopping" in server.stdout.read_text()
        assert port_is_free(server.port)
    finally:
        server.close()


def write_pngs(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(photo(i, 40 + i % 7, 56)).save(folder / f"{i:03d}.png")
    return sorted(p.name for p in folder.iterdir())


def sigterm_once(cwd: Path, flags: list[str], ready) -> tuple[int, str, list[int]]:
    """Run the CLI with ``flags`` under its own Ray, SIGTERM it once ``ready()`` is truthy:
    (exit code, stderr, pids of the run's Ray processes still alive 2 s after it exited)."""
    ray_tmp = short_tmp()
    run = subprocess.Popen([SCRIPT, *flags], cwd=cwd, env=own_ray_env(ray_tmp), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline, "not ready to be stopped after 300 s"
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=120)
        stderr = run.stderr.read()
        time.sleep(2)
        return code, stderr, [pid for pid in marked_pids(ray_tmp) if pid != run.pid]
    finally:
        kill_run(run, ray_tmp)


@pytest.mark.large  # a CLI run with its own Ray, stopped: minutes on 2 cores (pytest -m large)
def test_sigterm_stops_predict_with_143_and_whole_files_then_a_rerun_finishes(tmp_path):
    names = write_pngs(tmp_path / "in", 200)
    flags = ["predict", "--input", "in", "--output", "out", "--model", "tiny", "--num-classes", "5",
             "--image-size", "64", "--batch-size", "2", "--decode-batch-size", "2"]  # fmt: skip
    code, stderr, _ = sigterm_once(tmp_path, flags, lambda: list((tmp_path / "out/masks").glob("*.png")))  # mid-way
    assert code == 143, stderr
    assert stderr.splitlines()[-1] == "raydeeplab predict: stopped (SIGTERM); outputs written so far are kept", stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr  # (Ray's C++ may log an actor warning)
    masks = sorted((tmp_path / "out/masks").glob("*.png"))
    tables = sorted((tmp_path / "out/predictions").glob("*.parquet"))
    for mask in masks:
        assert decode_mask_png(mask.read_bytes()).ndim == 2, mask  # whole: a cut PNG fails to decode
    recorded = [path for table in tables for path in pq.read_table(table).column("path").to_pylist()]
    assert len(recorded) < len(names), "the SIGTERM must land mid-way for this test to mean anything"
    print(f"\nSIGTERM mid-run: {len(masks)} masks and {len(recorded)} rows of {len(names)} kept, all whole")

    rerun = subprocess.run([SCRIPT, *flags], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(recorded)} skipped" in rerun.stdout, rerun.stdout
    rows = [path for table in (tmp_path / "out/predictions").glob("*.parquet") for path in pq.read_table(table).column("path").to_pylist()]
    assert sorted(os.path.basename(p) for p in rows) == names  # every input once, none twice
    assert sorted(p.name for p in (tmp_path / "out/masks").glob("*.png")) == sorted(n + ".png" for n in names)


@pytest.mark.large  # a CLI training run with its own Ray, stopped: minutes on 2 cores (pytest -m large)
def test_sigterm_stops_train_with_143_and_the_same_command_resumes_from_its_checkpoint(tmp_path):
    """SIGTERM once epoch 1 is checkpointed: exit 143 with one line, every Ray process of the run
    gone, the checkpoint kept; the same command again resumes from it (Ray Train's run snapshot
    under ``OUT/_ray``) and ends with a loadable ``best/``."""
    from raydeeplab.data import synthetic
    from raydeeplab.presets import load_model

    synthetic.make_shapes_dataset(str(tmp_path / "data"), 24, size=(48, 64), num_classes=4, layout="voc")
    flags = ["train", "--data", "data", "--output", "run", "--model", "tiny", "--num-classes", "4", "--image-size", "64",
             "--batch-size", "8", "--epochs", "4", "--workers", "2", "--cpus-per-worker", "0.5", "--gallery", "0"]  # fmt: skip
    code, stderr, left = sigterm_once(  # once epoch 1 is checkpointed
        tmp_path, flags, lambda: list((tmp_path / "run/_ray").rglob("checkpoint_*/metrics.json"))
    )
    assert code == 143, stderr
    assert stderr.splitlines()[-1] == "raydeeplab train: stopped (SIGTERM); outputs written so far are kept", stderr
    assert "Traceback" not in stderr, stderr
    assert not left, f"Ray processes left running after the stop: {left}"
    checkpoints = list((tmp_path / "run/_ray").rglob("checkpoint_*/metrics.json"))
    assert checkpoints

    rerun = subprocess.run([SCRIPT, *flags], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    state = json.loads((tmp_path / "run/metrics.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    assert state["resumed_at_epochs"] and state["resumed_at_epochs"][0] >= 1, state["resumed_at_epochs"]
    assert load_model(str(tmp_path / "run/best")).count_params() > 0
    print(f"\nSIGTERM after epoch {state['resumed_at_epochs'][0]}: exit 143, no Ray process left; rerun resumed, 4/4 epochs")
