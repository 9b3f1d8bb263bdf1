import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.make_shards import main as make_shards_cli
from l2r import shard_reader as data, shards
from pipeline.dataset import read_shards
from tests.conftest_ray import ray_local  # noqa: F401
from tests.test_data import s3  # noqa: F401  (moto S3 fixture)


def save_image(path: Path, value: int, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    # Names chosen to collide after key sanitising, and a nested folder.
    for i in range(5):
        save_image(root / "cat" / f"img.{i}.png", 10 + i)
    save_image(root / "cat" / "img_0.png", 20)
    for i in range(4):
        save_image(root / "dog" / "sub" / f"{i}.jpg", 100 + i, fmt="JPEG")
    (root / "dog" / "readme.txt").write_text("skip me")
    return root


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return [m.name for m in tar.getmembers()]


def test_folder_round_trip_through_ray(ray_local, image_folder, tmp_path):
    out = tmp_path / "shards"
    urls = shards.make_shards(str(out), folder=str(image_folder), max_count=4, seed=1, progress=False)
    assert [Path(u).name for u in urls] == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    assert json.loads((out / "classes.json").read_text()) == {"0": "cat", "1": "dog"}
    rows = read_shards(str(out), 6, num_cpus=0.5).take_all()
    keys = sorted(r["key"] for r in rows)
    assert len(keys) == len(set(keys)) == 10  # every image exactly once
    assert all(r["error"] is None for r in rows)
    assert {r["key"]: r["label"] for r in rows} == {
        **{f"cat_img_{i}": 0 for i in range(5)},
        "cat_img_0_2": 0,
        **{f"dog_sub_{i}": 1 for i in range(4)},
    }
    # Labels agree with the pixels written for each class.
    for r in rows:
        assert (r["image"].mean() < 50) == (r["label"] == 0)


def test_same_seed_same_bytes_other_seed_other_order(image_folder, tmp_path):
    a = shards.make_shards(str(tmp_path / "a"), folder=str(image_folder), seed=3, progress=False)
    b = shards.make_shards(str(tmp_path / "b"), folder=str(image_folder), seed=3, progress=False)
    c = shards.make_shards(str(tmp_path / "c"), folder=str(image_folder), seed=4, progress=False)
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes()
    assert members(a[0]) != members(c[0]) and sorted(members(a[0])) == sorted(members(c[0]))


def test_max_size_limits_shard_bytes(image_folder, tmp_path):
    urls = shards.make_shards(str(tmp_path / "s"), folder=str(image_folder), max_count=None, max_size="4KB", progress=False)
    assert len(urls) > 1
    assert all(Path(u).stat().st_size <= 4000 or len(members(u)) == 2 for u in urls)  # a lone big sample may exceed
    assert sum(len(members(u)) for u in urls) == 20
    assert shards.parse_size("64MiB") == 64 << 20 and shards.parse_size("1.5GB") == 1_500_000_000


def test_csv_source(tmp_path):
    save_image(tmp_path / "imgs" / "a.png", 1)
    save_image(tmp_path / "imgs" / "b.png", 2)
    (tmp_path / "list.csv").write_text("path,label\nimgs/a.png,zebra\nimgs/b.png,ant\n")
    urls = shards.make_shards(str(tmp_path / "out"), csv_file=str(tmp_path / "list.csv"), progress=False)
    rows = {r["key"]: r["label"] for r in data.iter_shard(urls[0], 6)}
    assert rows == {"imgs_a": 1, "imgs_b": 0}
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"0": "ant", "1": "zebra"}


def test_synthetic_cli_writes_masks(tmp_path):
    out = tmp_path / "synth"
    make_shards_cli(["--synthetic", "12", "--size", "16", "--output", str(out), "--max-count", "5", "--no-progress"])
    urls = data.expand_urls(str(out))
    assert len(urls) == 3
    rows = [r for u in urls for r in data.iter_shard(u, 16, with_mask=True)]
    assert len(rows) == 12 and all(r["error"] is None for r in rows)
    assert sorted(r["label"] for r in rows) == sorted(i % 10 for i in range(12))
    assert all(r["mask"].any() for r in rows)
    assert json.loads((out / "classes.json").read_text())["0"] == "red_circle"


def test_write_to_s3(s3, image_folder):
    urls = shards.make_shards("s3://shards/made", folder=str(image_folder), max_count=6, filesystem=s3, progress=False)
    assert urls == ["s3://shards/made/train-0000.tar", "s3://shards/made/train-0001.tar"]
    rows = [r for u in data.expand_urls("s3://shards/made/*.tar", filesystem=s3) for r in data.iter_shard(u, 6, filesystem=s3)]
    assert len(rows) == 10 and all(r["error"] is None for r in rows)
    assert json.loads(s3.cat("shards/made/classes.json")) == {"0": "cat", "1": "dog"}


def test_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        shards.make_shards("x", folder="a", synthetic=3)
