"""Listing and resume at scale: the driver's peak Python memory and the time until the first input
reaches the pipeline, for the listing before issue 11 (one driver-side listing into a list, resume
as a set of every recorded name) and now (Ray tasks list one subfolder each; resume filters on
8-byte name hashes).

    python bench/listing.py --objects 20000 --folders 100

A moto S3 server (tests/s3_server.py) holds a bucket of ``--objects`` tiny ``.jpg`` objects spread
over ``--folders`` subfolders, and a previous run's predictions Parquet naming half of them. The
old code is the ``--old-rev`` version of raydeeplab/batch.py, read from git. Time to the first
mask is this time plus the pipeline's own first-mask latency (bench/infer.py), the same for both.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raydeeplab import batch, storage  # noqa: E402
from tests.s3_server import start_moto_server, stop_moto_server  # noqa: E402

OLD_REV = "22a16f9"  # the last raydeeplab/batch.py before streaming listing and hash-filtered resume


def old_functions(rev: str) -> dict:
    """``list_inputs`` and ``completed_inputs`` as they were at ``rev`` (with their helpers)."""
    source = subprocess.run(["git", "show", f"{rev}:raydeeplab/batch.py"], capture_output=True, text=True, check=True).stdout
    wanted = {"is_manifest", "read_manifest", "list_inputs", "completed_inputs"}
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    namespace = {"storage": storage, "pq": pq, "io": io, **{k: getattr(batch, k) for k in ("PATH", "PREDICTIONS_DIR", "MANIFEST_EXTENSIONS", "IMAGE_EXTENSIONS")}}
    exec(compile(tree, f"{rev}:raydeeplab/batch.py", "exec"), namespace)
    return namespace


def fill_bucket(endpoint: str, objects: int, folders: int) -> tuple[str, str]:
    """(input prefix, output prefix with predictions for every other object)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    keys = [f"in/f{i % folders:04d}/img_{i:08d}.jpg" for i in range(objects)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket="bench", Key=key, Body=b"x"), keys))
    done = pa.table({batch.PATH: [f"s3://bench/{key}" for key in keys[::2]]})
    sink = io.BytesIO()
    pq.write_table(done, sink)
    s3.put_object(Bucket="bench", Key="out/predictions/part-previous.parquet", Body=sink.getvalue())
    return "s3://bench/in", "s3://bench/out"


def measure(fn) -> tuple[float, float, int]:
    """(seconds to the first input, peak traced MiB, inputs to do) of ``fn`` -> iterator of batch sizes."""
    tracemalloc.start()
    started = time.perf_counter()
    first, total = None, 0
    for size in fn():
        first = first if first is not None else time.perf_counter() - started
        total += size
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return first, peak, total


def old_way(functions: dict, root: str, output: str):
    inputs = functions["list_inputs"](root)
    done = functions["completed_inputs"](output)
    todo = [(uri, rel) for uri, rel in inputs if uri not in done]
    yield len(todo)  # only now can the first input go to Ray (from_items of the whole list)


def new_way(root: str, output: str):
    from raydeeplab.config import PredictConfig

    cfg = PredictConfig(input=root, output=output, model="tiny")
    done = batch.completed_hashes(output)
    todo = batch.read_inputs(cfg).map_batches(batch.drop_completed, batch_format="numpy", fn_kwargs={"done": done})
    for rows in todo.iter_batches(batch_size=None, batch_format="numpy"):
        yield len(rows[batch.PATH])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--old-rev", default=OLD_REV)
    args = parser.parse_args()

    import ray

    process, endpoint = start_moto_server()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    try:
        started = time.perf_counter()
        root, output = fill_bucket(endpoint, args.objects, args.folders)
        print(f"{args.objects} objects in {args.folders} folders written in {time.perf_counter() - started:.0f} s", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        for name, fn in (("old", lambda: old_way(old_functions(args.old_rev), root, output)), ("new", lambda: new_way(root, output))):
            first, peak, todo = measure(fn)
            print(f"RESULT {name}: objects={args.objects} first_input_s={first:.2f} driver_peak_mib={peak:.1f} todo={todo}", flush=True)
    finally:
        stop_moto_server(process)


if __name__ == "__main__":
    main()
