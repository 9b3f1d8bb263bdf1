"""The package boundary: a built wheel, installed outside the checkout, is the whole library.

The wheel is built from a copy of the checkout (nothing written into it) with the running
interpreter's setuptools (`--no-build-isolation`: nothing downloaded), installed with `--no-deps`
into a fresh venv whose site-packages only points at this environment's for torch, timm and the
rest, and used there from a folder outside the checkout: every shipped explainer loads by name,
explains, and `l2r.attribute` and `l2r.score` run on it.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import RESNET20, ROOT, SHARED

MOBILENET_FILE, MOBILENET_WEIGHTS = SHARED / "models" / "mobilenet_v1.py", SHARED / "models" / "mobilenet_v1_0.5_160.pth"

# Run inside the fresh venv: loads every shipped explainer and reports what it found, as JSON.
USE_THE_WHEEL = r"""
import importlib.util, json, sys
import numpy as np
import l2r
from l2r.artifact import shipped_explainers

given = json.loads(sys.argv[1])  # name -> the target files to name (the shared ones), or a reason to skip
found = {"l2r_file": l2r.__file__, "shipped": shipped_explainers(), "explainers": {},
         "pipeline_importable": importlib.util.find_spec("pipeline") is not None}
rng = np.random.default_rng(0)
for name in found["shipped"]:
    fields = given.get(name, {})
    if "skip" in fields:
        found["explainers"][name] = {"skipped": fields["skip"]}
        continue
    explainer = l2r.load(name, **fields)
    photos = [rng.integers(0, 256, (45, 61, 3), dtype=np.uint8) for _ in range(3)]  # resized and cropped
    images = explainer.preprocess(photos)
    maps = explainer.explain(images)
    saliency = l2r.attribute("saliency", explainer.target, images)
    scores = {method: l2r.score(explainer.target, images, m, steps=5) for method, m in
              (("l2r", maps), ("saliency", saliency))}
    found["explainers"][name] = {
        "spec": explainer.record.spec, "images": list(images.shape), "maps": list(maps.shape),
        "saliency": list(saliency.shape), "map_std": float(maps.flatten(1).std(1).min()),
        "weights_sha256": explainer.record.weights_sha256,
        "trained_for": explainer.metadata["target"]["weights_sha256"],
        "aucs": {m: [float(s["deletion_auc"].min()), float(s["insertion_auc"].max())] for m, s in scores.items()},
    }
found["ray_imported"] = "ray" in sys.modules
print("RESULT " + json.dumps(found))
"""


def _target_files() -> dict:
    """What each shipped explainer needs named from a wheel: the shared files (a checkout's relative
    paths point outside the installed package), or why it is skipped."""
    missing = f"../shared not found at {SHARED}"
    return {
        "cifar10-vit": {},  # carries its target's weights
        "cifar10-resnet20": {"checkpoint": str(RESNET20)} if RESNET20.is_file() else {"skip": missing},
        "imagenet-sample-mobilenet": ({"spec": f"{MOBILENET_FILE}:MobileNetV1", "checkpoint": str(MOBILENET_WEIGHTS)}
                                      if MOBILENET_WEIGHTS.is_file() else {"skip": missing}),
    }


@pytest.mark.slow
def test_a_built_wheel_installs_l2r_only_and_loads_every_shipped_explainer(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT / "l2r", source / "l2r", ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / item, source / item)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                          str(source)], check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("l2r-*.whl")

    # What the wheel installs: the import name l2r (with the shipped explainers as its data), nothing else.
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["l2r"]
    assert {n.split("/")[0] for n in names} == {"l2r", info}
    shipped = sorted(p.parent.name for p in (ROOT / "l2r" / "explainers").glob("*/explainer.json"))
    for name in shipped:
        assert f"l2r/explainers/{name}/model.safetensors" in names and f"l2r/explainers/{name}/explainer.json" in names

    # A fresh venv; this environment's site-packages at the end of its path for the dependencies.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True).stdout.strip())
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "-q", "--target", str(fresh_site), str(wheel)],
                   check=True)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", USE_THE_WHEEL, json.dumps(_target_files())], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("RESULT ", 1)[1])

    assert Path(found["l2r_file"]).is_relative_to(fresh_site)  # the installed copy, not the checkout
    assert not found["pipeline_importable"] and not found["ray_imported"]
    assert found["shipped"] == shipped and len(shipped) >= 3
    for name, result in found["explainers"].items():
        if "skipped" in result:
            continue
        size = result["images"][-1]
        assert result["images"][:2] == [3, 3] and result["maps"] == [3, size, size] == result["saliency"], name
        assert result["weights_sha256"] == result["trained_for"], name  # the very target it was trained for
        assert result["map_std"] > 0, name
        for method, (deletion, insertion) in result["aucs"].items():
            assert 0 <= deletion and insertion <= 1, (name, method)
    assert "skipped" not in found["explainers"]["cifar10-vit"]
    skipped = {name: r["skipped"] for name, r in found["explainers"].items() if "skipped" in r}
    if skipped:
        pytest.skip(f"loaded {sorted(set(found['explainers']) - set(skipped))} from the wheel; skipped {skipped}")
