"""A run killed with SIGKILL mid-way, then rerun: one output per input, nothing truncated."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np

from raydeeplab import storage
from raydeeplab.batch import PATH, run_predict
from raydeeplab.config import PredictConfig
from raydeeplab.data.images import decode_mask_png
from tests.test_batch import read_rows, write_photos
from tests.test_security import kill_run, own_ray_env, short_tmp


def test_sigkilled_run_resumes_without_duplicates_or_truncated_files(ray_local, tmp_path, tiny_model):
    inputs = write_photos(str(tmp_path / "in"), 40)
    out = tmp_path / "out"
    flags = ["--input", str(tmp_path / "in"), "--output", str(out), "--model", tiny_model,
             "--batch-size", "2", "--decode-batch-size", "2"]  # fmt: skip
    ray_tmp = short_tmp()
    victim = subprocess.Popen(
        [sys.executable, "-m", "raydeeplab.cli", "--address", "local", "predict", *flags],
        env=own_ray_env(ray_tmp), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((out / "predictions").glob("part-*.parquet")):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no output after 300 s"
            time.sleep(0.2)
    finally:
        # As when a machine dies: every process of the run, and none left to finish a write after
        # the rerun below has listed what is done (those inputs got two rows).
        kill_run(victim, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)  # the killed Ray's session folder

    summary = run_predict(PredictConfig(input=str(tmp_path / "in"), output=str(out), model=tiny_model, batch_size=2))
    assert 0 < summary.skipped < len(inputs), "the kill must land mid-way for this test to mean anything"
    assert summary.skipped + summary.ok == len(inputs) and summary.failed == 0

    paths = [row[PATH] for row in read_rows(str(out))]
    assert sorted(paths) == sorted(inputs)  # exactly one row per input
    pngs = sorted(p for p in (out / "masks").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert [p.name for p in pngs] == sorted(os.path.basename(u) + ".png" for u in inputs)
    for png in pngs:
        assert decode_mask_png(png.read_bytes()).dtype == np.uint8  # decodes whole
    assert storage.exists(str(out / "_run.json"))
