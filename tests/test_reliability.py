"""What production does to a batch job, on real parts: a segmenter actor killed with SIGKILL, an
object store that goes away or throttles, one that refuses for good, an output disk that fills up
or turns read-only, a long run (memory, descriptors, temp files); and training whose workers die
during a checkpoint upload or whose store refuses its run snapshot for a while. Each test prints
its figure (``pytest -s``); README: Reliability quotes them.

``raydeeplab predict`` (and ``train``) runs as a subprocess with its own local Ray cluster, from a temporary folder
with relative paths (marked ``large``: ``pytest -m large tests/test_reliability.py``), except for
the disk tests, which run ``main()`` on the session cluster.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import pyarrow.parquet as pq
import pytest

from raydeeplab import storage
from raydeeplab.batch import ERROR, MASK_PATH, PATH
from raydeeplab.cli import main
from raydeeplab.data.images import decode_mask_png, encode_jpeg
from tests.corpus import photo
from tests.s3_server import HOST, free_port, start_moto_server, stop_moto_server

JOB_TIMEOUT = 600  # seconds a CLI run may take on two busy cores before the test fails
MASK_WAIT_S = 45  # seconds a first mask may take once later reads hang


# ---------------------------------------------------------------- parts


class FaultyProxy:
    """A TCP proxy in front of an S3 endpoint that fails the way stores do: ``down`` (connections
    refused, open ones cut), ``slowdown`` (every request answered 503 SlowDown) or ``deny`` (403
    AccessDenied); ``up`` forwards. Counts the requests it failed."""

    ANSWERS = {
        "slowdown": b"503 Slow Down", "deny": b"403 Forbidden",
    }  # fmt: skip
    CODES = {"slowdown": b"SlowDown", "deny": b"AccessDenied"}

    def __init__(self, upstream: str):
        self.upstream_port = int(upstream.rsplit(":", 1)[1])
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.mode, self.failed_requests = "up", 0
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.server: socket.socket | None = None
        self.listen()

    def listen(self) -> None:
        self.server = socket.create_server((HOST, self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self.accept, args=(self.server,), daemon=True).start()

    def set_mode(self, mode: str) -> None:
        """Switch, cutting open connections so that pooled keep-alive ones meet the new mode too."""
        if mode == "down" and self.server is not None:
            with contextlib.suppress(OSError):  # wakes the thread in accept(), which kept the socket listening
                self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()
            self.server = None
        elif mode != "down" and self.server is None:
            self.listen()
        self.mode = mode
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # closed: "down"
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def by_request(self, rule: Callable[[bytes], str]) -> threading.Event:
        """Mode ``rule``: each request is ``rule(its first line)``: ``up`` (forwarded), ``hold``
        (unanswered, the connection open: a store that hangs mid-upload), ``slowdown`` or ``deny``.
        Every request gets a connection of its own (``Connection: close``), so each is seen.
        Returns an event set once the rule has said anything but ``up``."""
        self.rule, self.hit = rule, threading.Event()
        self.set_mode("rule")
        return self.hit

    def serve(self, client: socket.socket) -> None:
        with self.lock:
            self.connections.add(client)
        try:
            if self.mode in self.ANSWERS:
                self.answer(client, self.mode)
                return
            head = b""
            if self.mode == "rule":
                head = read_head(client)
                with self.lock:
                    action = self.rule(head.split(b"\r\n", 1)[0])
                if action != "up":
                    self.hit.set()
                if action == "hold":
                    while self.mode == "rule":
                        time.sleep(0.1)
                    return
                if action in self.ANSWERS:
                    self.answer(client, action, head)
                    return
                head = closing(head)
            upstream = socket.create_connection((HOST, self.upstream_port))
            with self.lock:
                self.connections.add(upstream)
            upstream.sendall(head)
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
            pump(client, upstream)
        except OSError:
            pass
        finally:
            with self.lock:
                self.connections.discard(client)
            client.close()

    def answer(self, client: socket.socket, mode: str, head: bytes = b"") -> None:
        """One request's head read (unless given), answered with the store's error XML; the
        connection closed."""
        if not (head or read_head(client)):
            return
        body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>%s</Code><Message>injected</Message></Error>" % (
            self.CODES[mode]
        )
        client.sendall(
            b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (self.ANSWERS[mode], len(body), body)
        )
        with self.lock:
            self.failed_requests += 1

    def close(self) -> None:
        self.set_mode("down")


def read_head(client: socket.socket) -> bytes:
    """What the client sent up to the end of its first request's headers (and maybe beyond)."""
    head = b""
    client.settimeout(10)
    while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):
        head += chunk
    client.settimeout(None)
    return head


def closing(head: bytes) -> bytes:
    """``head`` with ``Connection: close``: the store closes after its answer, so the client opens
    a new connection (seen by the proxy) for its next request."""
    headers, _, rest = head.partition(b"\r\n\r\n")
    lines = [h for h in headers.split(b"\r\n") if not h.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + rest


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def own_store(moto_s3, monkeypatch):
    """A moto server of this test's own (never the session one: it is made to fail) behind a
    :class:`FaultyProxy`; this process talks to moto directly. Yields the proxy."""
    process, endpoint = start_moto_server()
    proxy = FaultyProxy(endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage.filesystem("s3://")[0].mkdir("data")
    try:
        yield proxy
    finally:
        proxy.close()
        stop_moto_server(process)


def write_inputs(folder: str, count: int) -> list[str]:
    """``count`` small JPEGs of varied sizes (masks come back at each source size) in 12
    subfolders, each listed by its own task."""
    uris = [storage.join(folder, f"s{i % 12:02d}", f"img_{i:03d}.jpg") for i in range(count)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, encode_jpeg(photo(24 + i % 17, 40 + i % 13)))
    return uris


def start_cli(cwd, endpoint: str | None, verb: str, *flags: str) -> subprocess.Popen:
    """``raydeeplab VERB FLAGS`` with its own local Ray cluster, in its own process group (the
    cluster's processes too), from ``cwd``, reaching S3 at ``endpoint`` (None: local files only)."""
    env = {**os.environ, "RAY_ADDRESS": "", **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "raydeeplab.cli", "--address", "local", verb, *flags],
        cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def start_predict(cwd, tiny_model: str, input_uri: str, output: str, endpoint: str) -> subprocess.Popen:
    """``raydeeplab predict`` (:func:`start_cli`) with the model given relative to ``cwd``."""
    return start_cli(cwd, endpoint, "predict", "--input", input_uri, "--output", output, "--model",
                     os.path.relpath(tiny_model, cwd), "--batch-size", "4", "--decode-batch-size", "4")  # fmt: skip


def finish(job: subprocess.Popen) -> tuple[int, str]:
    """(exit code, stderr) of ``job``; its session is killed whatever happens."""
    try:
        _, err = job.communicate(timeout=JOB_TIMEOUT)
        return job.returncode, err
    finally:
        for pid, _ in session_processes(job.pid):  # the Ray cluster it started, if still there
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()


def session_processes(session: int) -> list[tuple[int, bytes]]:
    """``(pid, command line)`` of every process in ``session``: Ray puts its raylet and workers
    in process groups of their own, but they stay in the session of the driver that started them."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(entry)
            if os.getsid(pid) == session:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found.append((pid, f.read()))
    return found


def wait_for_first_part(job: subprocess.Popen, output: str, folder: str = "predictions") -> None:
    """Until the job has committed its first batch (or written a first file in ``folder``): the
    fault must land mid-way."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not storage.list_files(storage.join(output, folder)):
        assert job.poll() is None, f"the job ended before the fault: {job.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no output in time"
        time.sleep(0.2)


def read_rows(output: str) -> list[dict]:
    rows = []
    for part in storage.list_files(storage.join(output, "predictions"), (".parquet",)):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist()
    return rows


def assert_done_means_written(output: str) -> list[dict]:
    """Every row is an ok input whose mask exists whole, and no input has two rows."""
    rows = read_rows(output)
    paths = [row[PATH] for row in rows]
    assert len(paths) == len(set(paths)), "an input has two rows"
    for row in rows:
        assert row[ERROR] is None, row
        assert decode_mask_png(storage.read_bytes(row[MASK_PATH])).shape == (row["height"], row["width"])
    return rows


# ---------------------------------------------------------------- 1. a segmenter actor dies


def segmenter_pids(session: int) -> list[int]:
    """PIDs of the Ray Data segmenter actors in ``session`` (their process title names the class)."""
    return [pid for pid, title in session_processes(session) if b"SegmenterPredictor" in title]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (``/proc/PID/stat``): what the process has done so far,
    whatever else the machine is doing."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


KILL_AT_CPU_S = 6.0  # the actor's CPU time at the kill: past its model load and compile (~3 s
# measured), well before the end of its work (~10 s for 480 images): so it dies mid-batch. (Its
# first mask is too late a signal: writes trail the segmenter, which may be done by then.)


@pytest.mark.large  # a CLI run with its own Ray: minutes on 2 busy cores
def test_killed_segmenter_actor_is_restarted_and_every_input_gets_one_row(bucket, tmp_path, tiny_model):
    inputs = write_inputs(f"{bucket}/in", 480)
    job = start_predict(tmp_path, tiny_model, f"{bucket}/in", f"{bucket}/out", os.environ["AWS_ENDPOINT_URL"])
    seen: set[int] = set()  # every segmenter process the job had: the restarts, counted from outside
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (victims := segmenter_pids(job.pid)) or cpu_seconds(victims[0]) < KILL_AT_CPU_S:
            assert job.poll() is None, f"the job ended before the kill: {job.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the segmenter did not get that far in time"
            time.sleep(0.1)
        assert len(victims) == 1, victims  # one CPU actor
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        done_at_kill = len(read_rows(f"{bucket}/out"))
        seen.add(victims[0])
        while job.poll() is None:
            seen.update(segmenter_pids(job.pid))
            time.sleep(0.1)
    finally:
        code, err = finish(job)
    assert code == 0, err[-3000:]
    assert done_at_kill < len(inputs), "the kill must land mid-way"
    assert len(seen) == 2, f"the actor must be restarted once: segmenter processes {seen}"

    rows = assert_done_means_written(f"{bucket}/out")
    assert sorted(row[PATH] for row in rows) == sorted(inputs)
    masks = storage.list_files(f"{bucket}/out/masks")
    assert sorted(masks) == sorted(uri.replace("/in/", "/out/masks/") + ".png" for uri in inputs)
    record = json.loads(storage.read_bytes(f"{bucket}/out/_run.json"))
    assert record["actor_restarts"] == len(seen) - 1
    print(
        f"\nFIGURE actor killed after {done_at_kill}/{len(inputs)} rows: {record['actor_restarts']} restart, "
        f"{record['ok']} ok, 0 duplicates, job {record['seconds']:.0f} s, "
        f"{time.monotonic() - killed_at:.0f} s from kill to exit"
    )


# ---------------------------------------------------------------- 5. a long batch job

SOAK_IMAGES = 6000  # the actor's memory climbs for the first ~13 s (warm-up), then stays level


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.large  # a CLI run with its own Ray over thousands of images
def test_a_long_batch_job_keeps_memory_and_handles_flat_and_leaves_no_temp_files(tmp_path, tiny_model):
    """Resident memory and open descriptors of the driver and the segmenter actor, sampled every
    0.5 s over 6,000 images, compared between two fifths of the way (past the warm-up) and the
    end; new entries of ours in the temp folder after the job."""
    for i in range(SOAK_IMAGES):
        path = tmp_path / "in" / f"s{i % 12:02d}" / f"img_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(photo(24 + i % 17, 40 + i % 13)))
    temp_before = set(os.listdir(tempfile.gettempdir()))
    job = start_cli(tmp_path, None, "predict", "--input", "in", "--output", "out",
                    "--model", os.path.relpath(tiny_model, tmp_path), "--batch-size", "16")  # fmt: skip
    samples = []  # (driver RSS KiB, actor RSS KiB, driver fds, actor fds)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while job.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, StopIteration):
                if actors := segmenter_pids(job.pid):
                    pids = (job.pid, actors[0])
                    samples.append((*(status_kib(p, "VmRSS:") for p in pids), *(open_files(p) for p in pids)))
            time.sleep(0.5)
    finally:
        code, err = finish(job)
    assert code == 0, err[-3000:]
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert (record["ok"], record["failed"]) == (SOAK_IMAGES, 0)
    assert len(samples) >= 20, f"too few samples ({len(samples)}) to compare"
    mid, end = samples[len(samples) * 2 // 5], samples[-1]
    for name, index in (("driver", 0), ("actor", 1)):
        assert end[index] <= 1.1 * mid[index] + 64 * 1024, (name, mid[index] // 1024, end[index] // 1024)
        assert end[index + 2] <= mid[index + 2] + 8, (name, "descriptors", mid[index + 2], end[index + 2])
    new_entries = sorted(set(os.listdir(tempfile.gettempdir())) - temp_before)
    ours = [name for name in new_entries if name.startswith(("raydeeplab", "tmp")) or name.endswith(".partial")]
    assert not ours, f"left in the temp folder: {ours}"  # tempfile's and our own names
    print(
        f"\nFIGURE batch soak, {SOAK_IMAGES} images in {record['seconds']:.0f} s: RSS two fifths of the way -> end: "
        f"driver {mid[0] // 1024} -> {end[0] // 1024} MiB, actor {mid[1] // 1024} -> {end[1] // 1024} MiB; "
        f"open descriptors driver {mid[2]} -> {end[2]}, actor {mid[3]} -> {end[3]}; 0 temp files of ours "
        f"left (other new entries in the temp folder: {new_entries})"
    )


# ---------------------------------------------------------------- 2. a flaky or refusing object store

OUTAGE_SECONDS = 6  # connections refused, then as long again answered 503 SlowDown


@pytest.mark.large  # a CLI run with its own Ray: minutes on 2 busy cores
def test_store_outage_and_throttling_are_retried_and_nothing_is_lost(own_store, tmp_path, tiny_model):
    inputs = write_inputs("s3://data/in", 160)
    job = start_predict(tmp_path, tiny_model, "s3://data/in", "s3://data/out", own_store.endpoint)
    try:
        wait_for_first_part(job, "s3://data/out")
        done_before = len(read_rows("s3://data/out"))
        for mode in ("down", "slowdown"):
            own_store.set_mode(mode)
            time.sleep(OUTAGE_SECONDS)
        own_store.set_mode("up")
        running_after = job.poll() is None
    finally:
        code, err = finish(job)
    assert code == 0, err[-3000:]
    assert running_after and done_before < len(inputs), "the outage must land mid-way"
    assert own_store.failed_requests > 0, "no request met the throttling"

    rows = assert_done_means_written("s3://data/out")
    assert sorted(row[PATH] for row in rows) == sorted(inputs)
    record = json.loads(storage.read_bytes("s3://data/out/_run.json"))
    assert (record["ok"], record["failed"]) == (len(inputs), 0)
    print(
        f"\nFIGURE store down {OUTAGE_SECONDS} s then {OUTAGE_SECONDS} s of 503 SlowDown "
        f"({own_store.failed_requests} requests refused) after {done_before}/{len(inputs)} rows: "
        f"{record['ok']} ok, 0 lost, job {record['seconds']:.0f} s"
    )


def test_a_manifest_and_a_shard_opened_while_the_store_is_down_are_read_once_it_is_back(own_store, monkeypatch):
    """Streaming reads (a manifest, a Parquet shard) retry their open like whole-object reads do:
    s3fs and botocore alone give up on a store that refuses connections for a few seconds."""
    import numpy as np
    import pyarrow as pa

    from raydeeplab.batch import read_shard
    from raydeeplab.data.manifests import iter_manifest

    entries = [f"s3://data/in/{i}.jpg" for i in range(100)]
    storage.write_bytes("s3://data/m.txt", "\n".join(entries).encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": ["a", "b"], "jpeg": [encode_jpeg(photo()), b""]}), sink)
    storage.write_bytes("s3://data/s.parquet", sink.getvalue().to_pybytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", own_store.endpoint)  # from now on through the proxy
    for read in (
        lambda: [v for chunk in iter_manifest("s3://data/m.txt", ("path",)) for v in chunk["path"]],
        lambda: [list(rows[PATH]) for rows in read_shard({"shard": np.array(["s3://data/s.parquet"])}, "jpeg", "key", 64)],
    ):
        own_store.set_mode("down")
        threading.Timer(OUTAGE_SECONDS, own_store.set_mode, ["up"]).start()
        started = time.monotonic()
        assert read() in (entries, [["a", "b"]])
        assert time.monotonic() - started >= OUTAGE_SECONDS - 1  # it waited for the store


def test_a_checkpoint_file_read_by_ray_train_while_the_store_goes_down_is_read_whole(own_store, monkeypatch):
    """Ray Train downloads a checkpoint through :func:`storage.pyarrow_filesystem` as a stream,
    one GET per 50 MiB block (s3fs' read-ahead): a store down between two blocks must be waited
    out, as whole-object reads are, not end the restore."""
    import pyarrow.fs

    block = storage.filesystem("s3://")[0].default_block_size
    weights = os.urandom(block + 8 * 2**20)  # the 2nd GET comes after the first 50 MiB
    storage.write_bytes("s3://data/ckpt/model.weights.h5", weights)
    monkeypatch.setenv("AWS_ENDPOINT_URL", own_store.endpoint)
    fs = storage.pyarrow_filesystem("s3://data/ckpt")
    with fs.open_input_stream("data/ckpt/model.weights.h5") as stream:  # as pyarrow.fs.copy_files reads
        head = stream.read(2**20)
        own_store.set_mode("down")
        threading.Timer(OUTAGE_SECONDS, own_store.set_mode, ["up"]).start()
        started = time.monotonic()
        rest = stream.read()
    assert head + rest == weights
    assert time.monotonic() - started >= OUTAGE_SECONDS - 1  # it waited for the store
    local = tempfile.mkdtemp()
    pyarrow.fs.copy_files("data/ckpt", local, source_filesystem=fs)  # and the whole download
    with open(os.path.join(local, "model.weights.h5"), "rb") as f:
        assert f.read() == weights


@pytest.mark.large  # a CLI run with its own Ray: minutes on 2 busy cores
def test_masks_are_written_while_later_inputs_are_still_being_read(own_store, tmp_path, tiny_model):
    """On 2 CPUs Ray Data 2.60 reserves CPUs for upstream operators first: the write tasks got
    none until every input was decoded, so a long run wrote its first mask near its end. Here the
    reads of the later half of the inputs hang at the store until masks are written: before
    ``batch.write_resources`` none were (the reads waited out their retries first)."""
    inputs = sorted(write_inputs("s3://data/in", 48))
    later = {uri.removeprefix("s3://") for uri in inputs[24:]}

    def rule(line: bytes) -> str:  # b"GET /data/in/s06/img_006.jpg HTTP/1.1": path-style
        method, target = line.decode().split(" ")[:2]
        return "hold" if method == "GET" and target.lstrip("/").split("?")[0] in later else "up"

    held = own_store.by_request(rule)
    job = start_predict(tmp_path, tiny_model, "s3://data/in", "out", own_store.endpoint)
    try:
        assert held.wait(timeout=300), "the later inputs were never read"
        deadline = time.monotonic() + MASK_WAIT_S  # less than the held reads' retries (RETRY_SECONDS)
        while not (masks := list((tmp_path / "out/masks").rglob("*.png"))):
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"no mask within {MASK_WAIT_S} s while later reads hang"
            time.sleep(0.2)
    finally:
        own_store.set_mode("up")
        code, err = finish(job)
    assert code == 0, err[-3000:]
    assert {str(m.relative_to(tmp_path / "out/masks")) for m in masks} <= {u.split("/in/", 1)[1] + ".png" for u in inputs[:24]}
    assert sorted(row[PATH] for row in read_rows(str(tmp_path / "out"))) == inputs
    print(f"\nFIGURE {len(masks)} masks written while {len(later)} reads hung at the store; then all {len(inputs)} done")


@pytest.mark.large  # a CLI run with its own Ray: minutes on 2 busy cores
@pytest.mark.parametrize("fault", ["access denied", "bucket deleted"])
def test_store_refusing_for_good_ends_the_job_with_one_line_and_marks_only_finished_inputs_done(
    own_store, tmp_path, tiny_model, fault
):
    inputs = write_inputs("s3://data/in", 160)
    output = "s3://results/out"
    storage.filesystem("s3://")[0].mkdir("results")
    job = start_predict(tmp_path, tiny_model, "s3://data/in", output, own_store.endpoint)
    try:
        wait_for_first_part(job, output)
        if fault == "access denied":
            own_store.set_mode("deny")
        else:
            delete_bucket_under_writes("s3://results")
        started = time.monotonic()
    finally:
        code, err = finish(job)
    ended_in = time.monotonic() - started
    # Ray's own C++ log lines (core_worker.cc) may come first; ours is one line, without a traceback
    lines = [line for line in err.splitlines() if line.startswith("raydeeplab predict:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    expected = "(AccessDenied)" if fault == "access denied" else "bucket 'results' does not exist"
    assert lines[0].startswith("raydeeplab predict: error: --output s3://results/") and expected in lines[0], err
    assert err.rstrip().endswith(lines[0]), err  # nothing after it (Ray's retry advice was appended before)

    if fault == "access denied":
        own_store.set_mode("up")
        rows = assert_done_means_written(output)  # nothing done without its mask, nothing failed
        assert len(rows) < len(inputs)
    else:
        rows = []
    print(f"\nFIGURE {fault} after the first rows: exit 2 in {ended_in:.0f} s, {len(rows)} rows kept, one line: {lines[0]}")


def delete_bucket_under_writes(bucket: str, tries: int = 20) -> None:
    """Every object, then the bucket; again while the job's new writes make it "not empty"."""
    for _ in range(tries):
        with contextlib.suppress(OSError):
            storage.remove(bucket)
        if not storage.exists(bucket):
            return
    raise AssertionError(f"{bucket} could not be deleted under the job's writes")


# ---------------------------------------------------------------- 3. the output cannot be written


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of ``size`` at ``path`` (needs root with CAP_SYS_ADMIN); yields a function that
    turns it read-only."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() == 0:  # root writes through read-only permissions: nothing else to try
            pytest.skip(f"no tmpfs mount here: {mounted.stderr.decode().strip()}")
        yield lambda: [os.chmod(d, 0o555) for d, _, _ in os.walk(path)]
        return
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.large  # a CLI run with its own Ray per fault: minutes (pytest -m large)
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_unwritable_output_ends_the_job_and_marks_only_written_masks_done(
    ray_local, tmp_path, tiny_model, capsys, fault
):
    inputs = write_inputs(str(tmp_path / "in"), 120)
    disk = tmp_path / "disk"
    with small_disk(disk, "96k" if fault == "disk full" else "4m") as make_read_only:
        output = str(disk / "out")
        if fault == "read-only":
            watcher = threading.Thread(target=turn_read_only_after_some_masks, args=(output, make_read_only))
            watcher.start()
        args = ["predict", "--input", str(tmp_path / "in"), "--output", output, "--model", tiny_model,
                "--batch-size", "4", "--decode-batch-size", "4"]  # fmt: skip
        code = main(args)
        if fault == "read-only":
            watcher.join()
        err = capsys.readouterr().err  # Ray Data's own log lines too: the session cluster is not the CLI's
        lines = [line for line in err.splitlines() if line.startswith("raydeeplab predict:")]
        assert code == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith("raydeeplab predict: error: --output "), err
        assert ("no space left" if fault == "disk full" else "cannot write here") in lines[0], lines[0]
        rows = assert_done_means_written(output)
        masks = storage.list_files(os.path.join(output, "masks"))
        assert 0 < len(masks) < len(inputs) and len(rows) < len(inputs)
        assert not storage.exists(os.path.join(output, "_run.json"))
    print(f"\nFIGURE {fault} after {len(masks)} masks, {len(rows)} rows of {len(inputs)}: exit 2, one line: {lines[0]}")


def turn_read_only_after_some_masks(output: str, make_read_only, masks: int = 8) -> None:
    """Part-way: once ``masks`` masks are written."""
    deadline = time.monotonic() + JOB_TIMEOUT
    folder = os.path.join(output, "masks")
    while time.monotonic() < deadline and sum(len(files) for _, _, files in os.walk(folder)) < masks:
        time.sleep(0.02)
    make_read_only()


# ---------------------------------------------------------------- 6. training loses its store mid-upload


def start_train(cwd, data: str, output: str, endpoint: str) -> subprocess.Popen:
    """``raydeeplab train`` (:func:`start_cli`; 2 workers, 3 epochs): half a CPU per worker, so
    both and the data loading fit 2 cores."""
    return start_cli(cwd, endpoint, "train", "--data", os.path.relpath(data, cwd), "--output", output,
                     "--model", "tiny", "--num-classes", "4", "--image-size", "64", "--batch-size", "8",
                     "--epochs", "3", "--workers", "2", "--cpus-per-worker", "0.5", "--max-failures", "3",
                     "--gallery", "0")  # fmt: skip


def hold_second_checkpoint_after_one_file() -> Callable[[bytes], str]:
    """A :meth:`FaultyProxy.by_request` rule: the first checkpoint folder's uploads go through;
    of the second one's, the first file does and the rest hang."""
    folders: list[bytes] = []
    puts = collections.Counter()

    def rule(line: bytes) -> str:
        if not (found := re.match(rb"PUT /\S*/checkpoint_(\d[^/]*)/", line)):
            return "up"
        if found[1] not in folders:
            folders.append(found[1])
        puts[found[1]] += 1
        return "hold" if folders.index(found[1]) == 1 and puts[found[1]] > 1 else "up"

    return rule


@pytest.mark.large  # a CLI training run with its own Ray: minutes on 2 busy cores
def test_workers_killed_during_a_checkpoint_upload_resume_from_the_last_complete_checkpoint(own_store, tmp_path):
    """A preempted node, mid-upload: the store takes epoch 1's checkpoint, lets one file of epoch
    2's through and then hangs on the next; both workers are killed
    with SIGKILL while that upload waits, and the store comes back. The half-written folder is
    on the store, never registered: the restarted group must resume from epoch 1."""
    from ray.train import Result

    from raydeeplab.data import synthetic
    from raydeeplab.train import RUN_NAME, ray_storage

    data, output = str(tmp_path / "data"), "s3://data/run"
    synthetic.make_shapes_dataset(data, 24, size=(48, 64), num_classes=4, layout="voc")
    path, filesystem = ray_storage(output)  # this process talks to moto directly
    run_dir = f"{output}/_ray/{RUN_NAME}"

    def registered() -> list:
        try:
            return Result.from_path(f"{path}/{RUN_NAME}", storage_filesystem=filesystem).best_checkpoints
        except RuntimeError:  # nothing registered yet
            return []

    def folders() -> set[str]:
        """Names of the checkpoint folders on the store, registered or not."""
        return {found[1] for uri in storage.list_files(run_dir) if (found := re.search(r"/checkpoint_(\d[^/]*)/", uri))}

    def names(checkpoints: list) -> set[str]:
        return {c.path.rsplit("/checkpoint_", 1)[1] for c, _ in checkpoints}

    held = own_store.by_request(hold_second_checkpoint_after_one_file())
    job = start_train(tmp_path, data, output, own_store.endpoint)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not registered():
            assert job.poll() is None, f"training ended before epoch 1 was registered: {job.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        while not held.wait(0.2):
            assert job.poll() is None, f"training ended before epoch 2's upload: {job.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "epoch 2's upload never came"
        workers = [pid for pid, title in session_processes(job.pid) if b"RayTrainWorker" in title]
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        complete = names(registered())
        half_written = folders() - complete
        own_store.set_mode("up")
    finally:
        code, err = finish(job)
    assert code == 0, err[-3000:]
    assert len(half_written) == 1, (complete, half_written)

    state = json.loads(storage.read_bytes(f"{output}/metrics.json"))
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["resumed_at_epochs"] == [1]
    assert not names(registered()) & half_written  # never registered, so never loaded
    print(
        f"\nFIGURE training: both workers killed while epoch 2's checkpoint upload hung after one file "
        f"(folder checkpoint_{next(iter(half_written))} left half-written): resumed at epoch "
        f"{state['resumed_at_epochs'][0]}, finished 3/3 epochs"
    )


SNAPSHOT_OUTAGE_S = 15.0  # past what s3fs + botocore retry alone (the run ended after ~5 s of 503s)


@pytest.mark.large  # a CLI training run with its own Ray: minutes on 2 busy cores
def test_run_snapshot_writes_refused_for_a_while_are_retried_and_training_finishes(own_store, tmp_path):
    """Ray Train's controller writes the run's snapshot (the list of registered checkpoints) after
    each checkpoint and ends the run if that write fails; s3fs and botocore retry for a few
    seconds. Here the store answers 503 SlowDown to every snapshot write for SNAPSHOT_OUTAGE_S
    from the first one: the run must ride it out and finish."""
    from raydeeplab.data import synthetic

    data, output = str(tmp_path / "data"), "s3://data/run"
    synthetic.make_shapes_dataset(data, 24, size=(48, 64), num_classes=4, layout="voc")
    first: list[float] = []

    def refuse_snapshot_writes_for_a_while(line: bytes) -> str:
        if not (line.startswith(b"PUT ") and b"/checkpoint_manager_snapshot.json" in line):
            return "up"
        first.append(first[0] if first else time.monotonic())
        return "slowdown" if time.monotonic() - first[0] < SNAPSHOT_OUTAGE_S else "up"

    refused = own_store.by_request(refuse_snapshot_writes_for_a_while)
    job = start_train(tmp_path, data, output, own_store.endpoint)
    code, err = finish(job)
    assert code == 0, err[-3000:]
    assert refused.is_set() and own_store.failed_requests > 0
    state = json.loads(storage.read_bytes(f"{output}/metrics.json"))
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3] and not state["resumed_at_epochs"]
    print(
        f"\nFIGURE training: run-snapshot writes answered 503 for {SNAPSHOT_OUTAGE_S:.0f} s "
        f"({own_store.failed_requests} requests): retried, 3/3 epochs, no restart, exit 0"
    )
