"""Security (issue 12, item 7) and the Serve soak (item 5), on real parts.

`raydeeplab serve` and `raydeeplab predict` run as subprocesses, each on its own Ray whose
``RAY_TMPDIR`` is a fresh folder, so every file Ray writes for them can be searched for a
secret; requests go over real sockets; the S3 store is the moto server. Each test prints its
figures on a ``FIGURE`` line (``pytest -s``); README's "Security" section quotes them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydeeplab import storage
from raydeeplab.config import MAX_PIXELS, SERVE_MAX_PIXELS
from raydeeplab.data.images import decode_mask_png, encode_jpeg
from raydeeplab.data.synthetic import is_val, make_shapes_dataset
from raydeeplab.data.voc import LAYOUTS
from tests.corpus import corpus, photo
from tests.s3_server import HOST, free_port
from tests.test_cli import SCRIPT

BOMB_SIDE = 30_000  # declares 900 MP: 9x MAX_PIXELS; decoded to RGB it would be 2.7 GB
MAX_BODY = 300_000  # the served app's --max-body-bytes
REPO = str(Path(__file__).resolve().parents[1])
MARK = "RAYDEEPLAB_SECURITY_TEST"  # set in every process a test starts, to find (and end) them by id
MiB = 1 << 20
SOAK_S = 60  # loopback load, inside the default run's budget
SOAK_CLIENTS = 4


# ---------------------------------------------------------------- bombs (small files, huge images)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit palette PNG of ``side`` x ``side`` zeros: ~``side**2 / 8000`` bytes on disk,
    ``side**2`` bytes as a class map, 3x that as RGB."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows = [packer.compress(row * 1000) for _ in range(side // 1000)]
    rows += [packer.compress(row * (side % 1000)), packer.flush()]
    header = struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0)  # bit depth 1, colour type 3
    return b"".join([
        b"\x89PNG\r\n\x1a\n", png_chunk(b"IHDR", header), png_chunk(b"PLTE", bytes(6)),
        png_chunk(b"IDAT", b"".join(rows)), png_chunk(b"IEND", b""),
    ])  # fmt: skip


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) declares ``side`` x ``side``: a decoder that trusts
    it allocates the full frame before it finds the data missing."""
    data = bytearray(encode_jpeg(photo(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # after marker, length, precision
    return bytes(data)


def test_bombs_are_what_they_claim():
    for data in (png_bomb(), jpeg_bomb()):
        assert len(data) < 200_000 and Image.open(io.BytesIO(data)).size == (BOMB_SIDE, BOMB_SIDE)
    small = png_bomb(2000)  # the same construction, small enough to decode here
    np.testing.assert_array_equal(decode_mask_png(small), np.zeros((2000, 2000), np.uint8))


PEAK_RSS = """
import sys
from raydeeplab.data.images import ImageError, decode_image, decode_mask_png
decoders = {"image": decode_image, "mask": decode_mask_png}
def status_kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
for line in sys.stdin:
    decoder, path, cap = line.split()
    data = open(path, "rb").read()
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS:")
    try:
        decoders[decoder](data, int(cap))
        outcome = "decoded"
    except ImageError as err:
        outcome = str(err)
    print((status_kib("VmHWM:") - before) * 1024, outcome, flush=True)
"""


def test_decoders_refuse_bombs_from_the_header_without_allocating_them(tmp_path):
    """Peak RSS around each decode, the peak reset before it (Linux ``clear_refs``: a peak reached
    while importing would hide the decode's). The last case decodes a 4000x4000 bomb under a
    raised cap: it shows the probe sees a 48 MB allocation."""
    files = {"bomb.png": png_bomb(), "bomb.jpg": jpeg_bomb(), "small_bomb.png": png_bomb(4000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [
        ("image", "bomb.png", MAX_PIXELS), ("image", "bomb.jpg", MAX_PIXELS), ("mask", "bomb.png", MAX_PIXELS),
        ("image", "bomb.png", SERVE_MAX_PIXELS), ("image", "small_bomb.png", 4000 * 4000),
    ]  # fmt: skip
    lines = "".join(f"{d} {tmp_path / n} {cap}\n" for d, n, cap in cases)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS], input=lines, capture_output=True, text=True, check=True)
    results = [line.split(" ", 1) for line in out.stdout.splitlines()]
    assert len(results) == len(cases), out.stderr
    for (decoder, name, cap), (grew, outcome) in zip(cases[:-1], results):
        assert outcome == f"too many pixels: {BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE**2} > max_pixels={cap}", (decoder, name)
        assert int(grew) < 16 * MiB, (decoder, name, int(grew) / MiB)
    control_grew, control = results[-1]
    assert control == "decoded" and int(control_grew) > 40 * MiB, (control, int(control_grew) / MiB)
    print(f"FIGURE decode bombs: peak RSS grew {max(int(g) for g, _ in results[:-1]) / MiB:.1f} MiB at most "
          f"(a 4000x4000 one decoded under a raised cap: {int(control_grew) / MiB:.0f} MiB)")  # fmt: skip


# ---------------------------------------------------------------- processes started here


def cli_env(**extra: str) -> dict[str, str]:
    """This environment for the console script, quiet, starting its own Ray; this checkout first
    on the path (the script must import it from any cwd, whatever the install points at)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYDEEPLAB_VERBOSE")}
    path = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, **extra}


def own_ray_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    """:func:`cli_env` for a CLI whose Ray lives under ``ray_tmp``, marked as ours."""
    return cli_env(RAY_TMPDIR=ray_tmp, **{MARK: ray_tmp}, **extra)


def short_tmp() -> str:
    return tempfile.mkdtemp(prefix="rdl", dir="/tmp")  # Ray's socket paths must fit in 107 bytes


def marked_pids(ray_tmp: str) -> list[int]:
    """Processes whose environment carries our mark for ``ray_tmp``: the CLI and every Ray process."""
    needle = f"{MARK}={ray_tmp}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                pids.append(int(entry))
        except OSError:  # gone, or another user's
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop(process: subprocess.Popen, ray_tmp: str) -> None:
    """SIGINT (Ctrl-C) the CLI, then end whatever it left of its Ray."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=120)
    kill_run(process, ray_tmp)


def kill_run(process: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the CLI ``process`` and every process of its Ray (:func:`kill_marked`)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    kill_marked(ray_tmp)


def kill_marked(ray_tmp: str, timeout_s: float = 60) -> None:
    """SIGKILL every process marked for ``ray_tmp`` and return once none is alive. Ray's workers
    have process groups of their own: killing the CLI's group left them running for 2-3 s, and
    one finished a write it had begun 9 ms after its driver died (tests/test_resume.py)."""
    deadline = time.monotonic() + timeout_s
    while pids := marked_pids(ray_tmp):
        assert time.monotonic() < deadline, f"processes of {ray_tmp} still alive after {timeout_s} s: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def files_holding(root: str | Path, secret: str) -> list[str]:
    """Regular files below ``root`` whose bytes contain ``secret``."""
    hits, needle = [], secret.encode()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                if os.path.isfile(path) and not os.path.islink(path) and needle in Path(path).read_bytes():
                    hits.append(path)
            except OSError:
                continue
    return hits


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes and open file descriptors of a live process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    kb = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    return {**kb, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# ---------------------------------------------------------------- `raydeeplab serve` with auth


class Server(NamedTuple):
    url: str
    port: int
    token: str
    process: subprocess.Popen
    ray_tmp: str
    folder: Path  # its cwd, with stdout.txt and stderr.txt

    def pid_of(self, title: str) -> int:
        """The Ray worker whose process title contains ``title`` (ServeReplica, ProxyActor)."""
        (pid,) = [pid for pid in marked_pids(self.ray_tmp) if cmdline(pid).startswith(f"ray::{title}")]
        return pid


def start_server(folder: Path, model: str, token_source: str) -> Server:
    """`raydeeplab serve` with a fresh token from an env var or a file; returns once it answers."""
    token, ray_tmp, port = f"rdl-{uuid.uuid4().hex}", short_tmp(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    if token_source == "env":
        env, flags = own_ray_env(ray_tmp, RDL_SERVE_TOKEN=token), ["--auth-token-env", "RDL_SERVE_TOKEN"]
    else:
        (folder / "token").write_text(token + "\n")
        env, flags = own_ray_env(ray_tmp), ["--auth-token-file", "token"]
    argv = [SCRIPT, "serve", "--model", model, "--host", HOST, "--port", str(port),
            "--max-batch-size", "4", "--max-body-bytes", str(MAX_BODY), *flags]  # fmt: skip
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=err, start_new_session=True)
    server = Server(f"http://{HOST}:{port}", port, token, process, ray_tmp, folder)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop(process, ray_tmp)
            raise RuntimeError(f"raydeeplab serve exited {process.returncode}: {(folder / 'stderr.txt').read_text()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(process, ray_tmp)
    raise RuntimeError("raydeeplab serve did not answer /healthz within 400 s")


def close_server(server: Server) -> None:
    stop(server.process, server.ray_tmp)
    shutil.rmtree(server.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """One `raydeeplab serve` (token from an env var) for the refusal tests and the soak."""
    server = start_server(tmp_path_factory.mktemp("serve_env"), tiny_model, "env")
    try:
        yield server
    finally:
        close_server(server)


def authorized(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {server.token}"})


def metrics_text(server: Server) -> str:
    """Ray's Prometheus export of this cluster: the targets Ray lists for Prometheus to scrape."""
    discovery = Path(server.ray_tmp) / "ray" / "prom_metrics_service_discovery.json"
    texts = []
    for target in {t for group in json.loads(discovery.read_text()) for t in group["targets"]}:
        try:
            texts.append(httpx.get(f"http://{target}/metrics", timeout=30).text)
        except httpx.HTTPError:  # a component that exports nothing yet
            continue
    return "".join(texts)


def exercise_and_search(server: Server) -> dict[str, int]:
    """Wrong, missing and right tokens on every route; then every place the token could leak to."""
    near_miss = server.token[:-1] + ("0" if server.token[-1] != "0" else "1")
    answers, statuses = [], {}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name, header in [("none", None), ("wrong", f"Bearer {near_miss}"), ("basic", f"Basic {server.token}"),
                             ("right", f"Bearer {server.token}")]:  # fmt: skip
            headers = {"Authorization": header} if header else {}
            for route in ("/model", "/stats"):
                answers.append(c.get(route, headers=headers))
            answers.append(c.post("/segment", headers=headers, files={"image": ("x.jpg", corpus()["ok.jpg"][0])}))
            answers.append(c.post("/segment?format=json", headers=headers, content=b"not an image"))
            statuses[name] = [a.status_code for a in answers[-4:]]
    assert statuses == {"none": [401] * 4, "wrong": [401] * 4, "basic": [401] * 4, "right": [200, 200, 200, 400]}
    for secret in (server.token, near_miss):
        for answer in answers:
            assert secret not in answer.text and secret not in str(answer.headers), answer.request.url
    metrics = metrics_text(server)
    assert "ray_" in metrics  # the export answered with Ray's metrics
    assert server.token not in metrics
    processes = marked_pids(server.ray_tmp)
    assert not [pid for pid in processes if server.token in cmdline(pid)], "token on a command line (ps shows it)"
    stop(server.process, server.ray_tmp)  # Ctrl-C first: shutdown logs are searched too
    leaks = files_holding(server.ray_tmp, server.token) + files_holding(server.folder, server.token)
    leaks += files_holding(server.ray_tmp, near_miss)
    assert leaks == [str(server.folder / "token")] * (server.folder / "token").exists()
    logs = sum(1 for _ in Path(server.ray_tmp).rglob("*.log")) + sum(1 for _ in Path(server.ray_tmp).rglob("*.out"))
    assert logs > 5, "Ray wrote no logs where they were searched"
    return {"requests": len(answers), "log files": logs, "processes": len(processes), "metrics bytes": len(metrics)}


@pytest.mark.large  # a Serve app or a CLI run with its own Ray: minutes (pytest -m large)
@pytest.mark.parametrize("source", ["env", "file"])
def test_bearer_token_never_leaks_into_logs_metrics_or_answers(source, tmp_path, tiny_model):
    server = start_server(tmp_path / "serve", tiny_model, source)
    try:
        searched = exercise_and_search(server)
    finally:
        close_server(server)
    print(f"FIGURE token ({source}): absent from {searched}, stdout/stderr and every process's command line")


# ---------------------------------------------------------------- bodies over the cap


def send_slowly(port: int, head: bytes, chunks, pause_s: float, deadline_s: float) -> tuple[bytes, int, float]:
    """Send ``head`` then ``chunks``, looking for an answer before each; (answer, body bytes sent
    before it came, seconds until it came)."""
    sent, started = 0, time.monotonic()
    with socket.create_connection((HOST, port), timeout=deadline_s) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.settimeout(pause_s)
            try:
                if first := sock.recv(65536):
                    return read_answer(sock, first), sent, time.monotonic() - started
            except TimeoutError:
                pass
            if time.monotonic() - started > deadline_s:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):  # closed on us: the answer is waiting
                break
            sent += len(chunk)
        sock.settimeout(10)
        return read_answer(sock, b""), sent, time.monotonic() - started


def read_answer(sock: socket.socket, data: bytes) -> bytes:
    """The rest of one HTTP response (headers and its Content-Length of body)."""
    sock.settimeout(10)
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length and len(body) >= int(length[1]):
            return data
        try:
            more = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return data
        if not more:
            return data
        data += more


@pytest.mark.large  # a Serve app or a CLI run with its own Ray: minutes (pytest -m large)
def test_oversize_body_gets_413_before_it_is_sent(served):
    """A declared 200 MB body trickled at 1 KB / 50 ms, and a chunked one pushed as fast as the
    socket takes it: 413 arrives after a fraction of the body; replica and proxy stay small."""
    replica, proxy = served.pid_of("ServeReplica"), served.pid_of("ProxyActor")
    before = {pid: proc_status(pid) for pid in (replica, proxy)}
    auth = f"Authorization: Bearer {served.token}\r\n"
    declared = 200 * MiB
    head = (f"POST /segment HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/octet-stream\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()  # fmt: skip
    answer, trickled, declared_s = send_slowly(served.port, head, iter(lambda: bytes(1024), None), 0.05, 120)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"over the 300000-byte limit" in answer and trickled < MAX_BODY, trickled

    head = (f"POST /segment HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip
    chunk = b"10000\r\n" + bytes(0x10000) + b"\r\n"
    answer, pushed, _ = send_slowly(served.port, head, (chunk for _ in range(declared // 0x10000)), 0.001, 120)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert pushed < declared // 4, pushed
    after = {pid: proc_status(pid) for pid in (replica, proxy)}
    grew = {pid: after[pid]["VmHWM"] - before[pid]["VmHWM"] for pid in after}
    assert max(grew.values()) < 32 * MiB, grew  # nowhere near the 200 MB declared
    with authorized(served) as c:  # and it keeps answering
        assert c.post("/segment", content=corpus()["ok.jpg"][0]).status_code == 200
    print(f"FIGURE body cap: declared {declared // MiB} MiB -> 413 after {trickled} B trickled, in {declared_s:.2f} s; "
          f"chunked -> 413 after {pushed / MiB:.1f} MiB pushed; peak RSS grew replica "
          f"{grew[replica] / MiB:.1f} MiB, proxy {grew[proxy] / MiB:.1f} MiB")  # fmt: skip


# ---------------------------------------------------------------- bombs in every decoding path


@pytest.mark.large  # a Serve app or a CLI run with its own Ray: minutes (pytest -m large)
def test_served_bombs_are_refused_with_the_reason_and_no_allocation(served):
    replica = served.pid_of("ServeReplica")
    before = proc_status(replica)
    with authorized(served) as c:
        for data in (png_bomb(), jpeg_bomb()):
            for kwargs in ({"content": data}, {"files": {"image": ("bomb", data)}}):
                answer = c.post("/segment", **kwargs)
                assert answer.status_code in (400, 413, 422), answer.text
                assert answer.json()["detail"].startswith(f"too many pixels: {BOMB_SIDE}x{BOMB_SIDE}"), answer.text
        assert c.post("/segment", content=corpus()["ok.jpg"][0]).status_code == 200
    grew = proc_status(replica)["VmHWM"] - before["VmHWM"]
    assert grew < 64 * MiB, grew / MiB  # one decoded bomb would be 2.7 GB
    print(f"FIGURE serve bombs: 4 refused, replica peak RSS grew {grew / MiB:.1f} MiB")


@pytest.mark.large  # a Serve app or a CLI run with its own Ray: minutes (pytest -m large)
def test_predict_refuses_bombs_as_rows_and_keeps_the_secret_key_out_of_run_json_and_logs(bucket, tiny_model, tmp_path):
    secret = f"rdl-secret-{uuid.uuid4().hex}"  # moto accepts any key pair
    inputs = {"ok.jpg": corpus()["ok.jpg"][0], "gray.png": corpus()["gray.png"][0],
              "bomb.png": png_bomb(), "bomb.jpg": jpeg_bomb()}  # fmt: skip
    for name, data in inputs.items():
        storage.write_bytes(f"{bucket}/in/{name}", data)
    ray_tmp = short_tmp()
    env = own_ray_env(ray_tmp, AWS_ACCESS_KEY_ID="rdl-key-id", AWS_SECRET_ACCESS_KEY=secret)
    try:
        run = subprocess.run(
            [SCRIPT, "predict", "--input", f"{bucket}/in", "--output", "out", "--model", tiny_model],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        kill_marked(ray_tmp)  # what the finished CLI's Ray left, if anything
        assert run.returncode == 0, run.stderr
        assert f"its logs: {ray_tmp}" in run.stdout  # the folder the CLI names is the one searched
        rows = pq.read_table(tmp_path / "out" / "predictions").to_pylist()
        errors = {row["path"].rsplit("/", 1)[1]: row["error"] for row in rows}
        assert errors.keys() == inputs.keys() and errors["ok.jpg"] is None and errors["gray.png"] is None
        for bomb in ("bomb.png", "bomb.jpg"):
            assert errors[bomb] == f"too many pixels: {BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE**2} > max_pixels={MAX_PIXELS}"
        summary = json.loads((tmp_path / "out" / "_run.json").read_text())
        assert summary["failed"] == 2, summary
        leaks = files_holding(tmp_path / "out", secret) + files_holding(ray_tmp, secret)
        assert leaks == [] and secret not in run.stdout + run.stderr
        logs = sum(1 for _ in Path(ray_tmp).rglob("*.log"))
        assert logs > 5, "Ray wrote no logs where they were searched"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"FIGURE predict: 2 bombs -> 2 rows 'too many pixels'; secret key absent from _run.json, "
          f"outputs, stdout/stderr and {logs} Ray log files")


def bombed_dataset(root: Path) -> tuple[str, str]:
    """A VOC-layout set whose first val image is a JPEG bomb and second val mask a PNG bomb."""
    splits = make_shapes_dataset(str(root), 8, size=(64, 64), num_classes=5, layout="voc")
    assert is_val(3) and splits["val"][:2] == ["img_000003", "img_000007"]
    image = root / LAYOUTS["voc"].image.format("img_000003")
    mask = root / LAYOUTS["voc"].mask.format("img_000007")
    image.write_bytes(jpeg_bomb())
    mask.write_bytes(png_bomb())
    return str(image.relative_to(root.parent)), str(mask.relative_to(root.parent))


def test_train_and_evaluate_refuse_bombs_naming_each_file(tmp_path, tiny_model):
    """Both verbs check every pair before Ray starts: exit 2, each bomb named with its reason."""
    image, mask = bombed_dataset(tmp_path / "voc")
    verbs = {
        "train": ["--model", "tiny", "--num-classes", "5", "--image-size", "64", "--batch-size", "2",
                  "--epochs", "1", "--workers", "1", "--output", "run"],
        "evaluate": ["--model", tiny_model, "--split", "val", "--output", "eval"],
    }  # fmt: skip
    env = cli_env()
    for verb, flags in verbs.items():
        started = time.monotonic()
        run = subprocess.run([SCRIPT, verb, "--data", "voc", *flags], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        seconds = time.monotonic() - started
        assert run.returncode == 2, (verb, run.stdout, run.stderr)
        assert "Ray cluster" not in run.stdout, verb  # refused before any cluster work
        refusal = f"too many pixels: {BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE**2} > max_pixels={MAX_PIXELS}"
        for bomb in (image, mask):
            (line,) = [line for line in run.stderr.splitlines() if bomb.split("/", 1)[1] in line]
            assert refusal in line, (verb, line)
        print(f"FIGURE {verb}: both bombs named, exit 2 in {seconds:.1f} s")


# ---------------------------------------------------------------- soak (item 5)


@pytest.mark.large  # 60 s of steady load (pytest -m large)
def test_soak_steady_load_keeps_replica_memory_and_handles_flat(served):
    """``SOAK_CLIENTS`` clients in a loop for ``SOAK_S`` seconds on loopback."""
    images = [encode_jpeg(photo(40 + 8 * i, 60 + 4 * i)) for i in range(8)]
    replica = served.pid_of("ServeReplica")
    with authorized(served) as c:
        for data in images:  # warm: every batch shape compiled, every buffer grown once
            assert c.post("/segment", content=data).status_code == 200
    start = proc_status(replica)
    ends = time.monotonic() + SOAK_S

    def client(index: int) -> list[tuple[int, float]]:
        done = []
        with authorized(served) as c:
            while time.monotonic() < ends:
                began = time.perf_counter()
                status = c.post("/segment", content=images[(index + len(done)) % len(images)]).status_code
                done.append((status, time.perf_counter() - began))
        return done

    with concurrent.futures.ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(SOAK_CLIENTS)) for r in rs]
    end = proc_status(replica)
    statuses = [s for s, _ in results]
    p50, p99 = np.percentile([t for _, t in results], [50, 99]) * 1000
    print(f"FIGURE soak {SOAK_S} s x {SOAK_CLIENTS} clients: {len(results)} requests, "
          f"{sum(200 <= s < 300 for s in statuses)} 2xx, p50 {p50:.0f} ms, p99 {p99:.0f} ms; replica RSS "
          f"{start['VmRSS'] / MiB:.0f} -> {end['VmRSS'] / MiB:.0f} MiB, open fds {start['fds']} -> {end['fds']}")  # fmt: skip
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    assert end["VmRSS"] - start["VmRSS"] < 64 * MiB, (start, end)
    assert end["fds"] - start["fds"] <= 4, (start, end)
