"""Listing and resume at scale: the driver's peak Python memory and the time until the first input
reaches the pipeline, for the listing before issue 11 (one driver-side listing into a list, resume
as a set of every recorded name) and now (Ray tasks list key prefixes; resume filters on 8-byte
name hashes); with ``--cli``, instead, ``raydeeplab predict`` itself: seconds to its first mask
and the driver's peak RSS by then.

    python bench/listing.py --objects 20000 --folders 100
    python bench/listing.py --objects 200000 --folders 0 --cli

A moto S3 server holds a bucket of ``--objects`` small JPEGs spread over ``--folders`` subfolders
(0: one flat prefix), and a previous run's predictions Parquet naming half of them. The old code
is the ``--old-rev`` version of raydeeplab/batch.py, read from git. Its time to the first mask is
at least its time to the first input.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raydeeplab import batch, storage  # noqa: E402
from raydeeplab.data.images import encode_jpeg  # noqa: E402
from raydeeplab.data.manifests import MANIFEST_EXTENSIONS  # noqa: E402
from tests.s3_server import HOST, free_port, stop_moto_server  # noqa: E402

OLD_REV = "22a16f9"  # the last raydeeplab/batch.py before streaming listing and hash-filtered resume


def old_functions(rev: str) -> dict:
    """``list_inputs`` and ``completed_inputs`` as they were at ``rev`` (with their helpers)."""
    source = subprocess.run(["git", "show", f"{rev}:raydeeplab/batch.py"], capture_output=True, text=True, check=True).stdout
    wanted = {"is_manifest", "read_manifest", "list_inputs", "completed_inputs"}
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    namespace = {"storage": storage, "pq": pq, "io": io, "MANIFEST_EXTENSIONS": MANIFEST_EXTENSIONS, **{k: getattr(batch, k) for k in ("PATH", "PREDICTIONS_DIR", "IMAGE_EXTENSIONS")}}
    exec(compile(tree, f"{rev}:raydeeplab/batch.py", "exec"), namespace)
    return namespace


def serve_filled(port: int, objects: int, folders: int) -> None:
    """A moto S3 server on ``port`` whose bucket ``bench`` holds ``objects`` small ``.jpg`` keys
    under ``in/``, in ``folders`` subfolders (0: one flat prefix). Filled through moto's backend in
    this process (200,000 keys in seconds; over HTTP moto takes ~200 a second), then served."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket("bench", "us-east-1")
    body = encode_jpeg(np.full((24, 32, 3), 128, np.uint8))  # a real image: the CLI run segments it
    for key in input_keys(objects, folders):
        backend.put_object("bench", key, body)
    ThreadedMotoServer(ip_address=HOST, port=port).start()
    print("serving", flush=True)
    while True:
        time.sleep(3600)


def input_keys(objects: int, folders: int) -> list[str]:
    return [f"in/f{i % folders:04d}/img_{i:08d}.jpg" if folders else f"in/img_{i:08d}.jpg" for i in range(objects)]


def filled_server(objects: int, folders: int) -> tuple[subprocess.Popen, str]:
    """(process, endpoint) of :func:`serve_filled` in a subprocess, plus a previous run's
    predictions Parquet naming every other input (what resume reads)."""
    import boto3

    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--objects", str(objects), "--folders", str(folders)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    for line in process.stdout:  # moto prints a line of its own first
        if line.strip() == "serving":
            break
    else:
        raise RuntimeError(f"the filled moto server exited with {process.wait()}")
    endpoint = f"http://{HOST}:{port}"
    done = pa.table({batch.PATH: [f"s3://bench/{key}" for key in input_keys(objects, folders)[::2]]})
    sink = io.BytesIO()
    pq.write_table(done, sink)
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket="bench", Key="out/predictions/part-previous.parquet", Body=sink.getvalue())
    return process, endpoint


def measure(fn) -> tuple[float, float, float, int]:
    """(seconds to the first input, to the last, peak traced MiB, inputs to do) of ``fn`` ->
    iterator of batch sizes."""
    tracemalloc.start()
    started = time.perf_counter()
    first, total = None, 0
    for size in fn():
        first = first if first is not None else time.perf_counter() - started
        total += size
    last = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return first, last, peak, total


def old_way(functions: dict, root: str, output: str):
    inputs = functions["list_inputs"](root)
    done = functions["completed_inputs"](output)
    todo = [(uri, rel) for uri, rel in inputs if uri not in done]
    yield len(todo)  # only now can the first input go to Ray (from_items of the whole list)


def new_way(root: str, output: str):
    from raydeeplab.config import PredictConfig

    cfg = PredictConfig(input=root, output=output, model="tiny")
    assert storage.has_files(root, batch.IMAGE_EXTENSIONS)  # the CLI's check before any Ray work
    done = batch.completed_hashes(output)
    todo = batch.read_inputs(cfg).map_batches(batch.drop_completed, batch_format="numpy", fn_kwargs={"done": done})
    for rows in todo.iter_batches(batch_size=None, batch_format="numpy"):
        yield len(rows[batch.PATH])


def cli_first_mask(endpoint: str) -> tuple[float, float]:
    """(seconds from start to the first mask object, the CLI process's peak RSS in MiB then) of
    ``raydeeplab predict`` over the bucket, as a user runs it; stopped (SIGTERM) at that mask."""
    import boto3

    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    s3 = boto3.client("s3", endpoint_url=endpoint)
    started = time.perf_counter()
    run = subprocess.Popen(["raydeeplab", "predict", "--input", "s3://bench/in", "--output", "s3://bench/out", "--model", "tiny",
                            "--num-classes", "5", "--image-size", "64"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        while not s3.list_objects_v2(Bucket="bench", Prefix="out/masks/", MaxKeys=1).get("KeyCount"):
            assert run.poll() is None, run.stderr.read().decode()
            time.sleep(0.5)
        first = time.perf_counter() - started
        status = Path(f"/proc/{run.pid}/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
    return first, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--folders", type=int, default=100, help="0: one flat prefix")
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--cli", action="store_true", help="instead, time `raydeeplab predict` to its first mask")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the filled server's own process
    args = parser.parse_args()
    if args.serve:
        serve_filled(args.serve, args.objects, args.folders)

    import ray

    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    started = time.perf_counter()
    process, endpoint = filled_server(args.objects, args.folders)
    env["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        print(f"{args.objects} objects in {args.folders} folders served after {time.perf_counter() - started:.0f} s", flush=True)
        if args.cli:
            first_mask, rss = cli_first_mask(endpoint)
            print(f"RESULT cli: objects={args.objects} folders={args.folders} first_mask_s={first_mask:.1f} driver_peak_rss_mib={rss:.0f}", flush=True)
            return
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        for name, fn in (("old", lambda: old_way(old_functions(args.old_rev), "s3://bench/in", "s3://bench/out")),
                         ("new", lambda: new_way("s3://bench/in", "s3://bench/out"))):  # fmt: skip
            first, last, peak, todo = measure(fn)
            print(f"RESULT {name}: objects={args.objects} folders={args.folders} first_input_s={first:.2f} "
                  f"last_input_s={last:.2f} driver_peak_mib={peak:.1f} todo={todo}", flush=True)  # fmt: skip
    finally:
        stop_moto_server(process)


if __name__ == "__main__":
    main()
