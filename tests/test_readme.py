"""The README's set-up section, run as a user types it: every command of its ``bash`` blocks, in
a fresh folder, relative defaults included. The ``pip install`` parts are CI's own install step
and ``pytest -q`` is what runs this test, so those two are the only parts left out."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = ("pip install ", "pytest")


def setup_commands() -> list[str]:
    """Commands of the set-up section's bash blocks, comments dropped, split on ``&&``."""
    section = README.read_text().split("\n## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            for part in line.split(" #", 1)[0].split("&&"):
                if part.strip() and not part.strip().startswith(NOT_RUN):
                    commands.append(part.strip())
    return commands


def test_readme_setup_commands_run_as_written_in_a_fresh_folder(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYDEEPLAB_VERBOSE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the installed script
    commands = setup_commands()
    assert commands[0] == "raydeeplab quickstart", commands  # the README's first command, verbatim
    outputs, seconds = [], []
    for command in commands:
        started = time.perf_counter()
        run = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=900,
        )  # fmt: skip
        seconds.append(time.perf_counter() - started)
        assert run.returncode == 0, f"{command}\n{run.stdout}"
        outputs.append(run.stdout)
    with capsys.disabled():
        print(f"\nREADME set-up: `raydeeplab quickstart` took {seconds[0]:.0f} s on {os.cpu_count()} CPUs")

    quickstart = outputs[0].splitlines()
    assert len(quickstart) <= 18, outputs[0]  # a line per phase, a few epoch lines and a summary, not the workers' logs
    untrained, trained = (float(x) for x in re.findall(r"held-out mean IoU (\d\.\d+)", outputs[0])[:2])
    assert trained > untrained + 0.1, outputs[0]
    printed = dict(re.findall(r"raydeeplab quickstart: (masks|Parquet|gallery)\b[^:]*: (\S+)", outputs[0]))
    out = tmp_path / "quickstart_out"  # the relative default, under the folder it ran from
    assert printed == {
        "masks": str(out / "predictions/masks"),
        "Parquet": str(out / "predictions/predictions"),
        "gallery": str(out / "run/gallery.png"),
    }
    assert list(Path(printed["Parquet"]).glob("*.parquet")) and list(Path(printed["masks"]).rglob("*.png"))
    counts = json.loads((out / "predictions/_run.json").read_text())
    assert counts["failed"] == 1 and counts["ok"] >= 4  # the broken file is a row, not a crash
    gallery = Image.open(io.BytesIO(Path(printed["gallery"]).read_bytes()))
    assert gallery.format == "PNG" and gallery.width > 300 and gallery.height > 300
    assert re.search(r"done in \d+ s", quickstart[-1]), quickstart[-1]

    inputs = list((out / "images").rglob("*.jpg"))
    masks = list((tmp_path / "my_masks/masks").rglob("*.png"))
    assert len(masks) == len(inputs) - 1, outputs[1]  # every image but the broken one
