"""The demo as a newcomer runs it, at reduced size, through a pipe (as in CI or a job log): what the
console shows there (plain progress lines with an ETA, none of Ray's INFO lines) is checked here."""

import os
import re
import subprocess
import sys

import pytest

from tests.test_api import readme_snippet
from tests.test_train import ROOT, TINY

SMALL = TINY + ["train.steps=4", "train.batch_size=4", "train.report_every=2", "train.checkpoint_every=2",
                "val.every=2"]


def demo(storage):
    """The demo with its run folder at `<storage>/demo`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "jobs/demo.py", "--storage", str(storage)] + [a for s in SMALL for a in ("--set", s)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_writes_every_artifact_reads_quietly_and_reuses_its_work(tmp_path, monkeypatch, capsys, another_ray):
    done = demo(tmp_path / "runs")  # as scripts/demo.sh: the run folder is runs/demo
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    run = tmp_path / "runs" / "demo"
    for name in ("data/train-0000.tar", "data/val-0000.tar", "target.pt", "config.yaml", "metrics.jsonl",
                 "explainer/explainer.json", "explainer/model.safetensors", "attribution/manifest.json",
                 "report/summary.md", "report/summary.json", "report/report.html", "report/summary.png",
                 "photo.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert list((run / "attribution").rglob("*.parquet"))
    assert (run / "report" / "summary.png").read_bytes().startswith(b"\x89PNG")
    # Progress with an ETA for each long stage; none of Ray's INFO lines or known-harmless C++ errors.
    lines = output.splitlines()
    for stage in ("fit target", "train", "attribute"):
        assert any(line.startswith(f"{stage}: ") and "ETA" in line for line in lines), stage
    training = [line for line in done.stdout.splitlines() if line.startswith("train: step ")]
    assert training[-1].startswith("train: step 4/4 (100%)") and "ETA 0s" in training[-1], training
    assert not [line for line in lines if " INFO " in line or "has constructor arguments in the object store" in line
                or "Reporting training result" in line]
    assert "\r" not in done.stdout
    # The closing summary: the table, where things are, how to look at them.
    assert re.search(r"^\| l2r \| 16 \| 0 \|", done.stdout, re.M)
    assert f"open {run}/report/report.html" in done.stdout and "http.server" in done.stdout

    # The README's notebook snippet, verbatim, on what the demo left (from the folder that holds runs/).
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # the demo's target model lives in the checkout
    namespace = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    images, maps = namespace["images"], namespace["maps"]
    assert images.shape[:2] == (1, 3) and maps.shape == (1, *images.shape[2:])  # the target's input size
    assert 0 <= float(namespace["scores"]["insertion_auc"][0]) <= 1 and "tensor" in capsys.readouterr().out

    again = demo(tmp_path / "runs")
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert "already trained" in again.stdout and "(1 already done, 0 to do)" in again.stdout
