import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from l2r import shard_reader as data
from pipeline.dataset import read_shards
from tests.helpers import png_bytes, write_tar
from tests.conftest_ray import ray_local  # noqa: F401  (session-scoped Ray fixture)

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def good_samples(prefix, n, start=0):
    return [(f"{prefix}{i:03d}", {"png": png_bytes(i), "cls": str(i % 3).encode()}) for i in range(start, start + n)]


@pytest.fixture
def shard_dir(tmp_path):
    for s in range(3):
        write_tar(tmp_path / f"train-{s:04d}.tar", good_samples(f"s{s}_", 4))
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_expand_urls_file_dir_glob_brace(shard_dir):
    names = [f"{shard_dir}/train-{s:04d}.tar" for s in range(3)]
    assert data.expand_urls(names[0]) == names[:1]
    assert data.expand_urls(str(shard_dir)) == names
    assert data.expand_urls(f"{shard_dir}/train-*.tar") == names
    assert data.expand_urls(f"{shard_dir}/train-{{0000..0001}}.tar") == names[:2]
    assert data.expand_urls([names[2], f"{shard_dir}/train-{{0000,0001}}.tar"]) == [names[2], *names[:2]]


def test_expand_urls_errors_name_the_spec(shard_dir):
    with pytest.raises(FileNotFoundError, match="nope-"):
        data.expand_urls(f"{shard_dir}/nope-*.tar")
    with pytest.raises(FileNotFoundError, match="train-0003.tar"):
        data.expand_urls(f"{shard_dir}/train-{{0000..0009}}.tar")


def test_expand_braces():
    assert data.expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert data.expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]


def test_iter_shard_reads_every_sample(shard_dir):
    rows = list(data.iter_shard(str(shard_dir / "train-0001.tar"), (8, 6)))
    assert [r["key"] for r in rows] == [f"s1_{i:03d}" for i in range(4)]
    assert [r["label"] for r in rows] == [0, 1, 2, 0]
    assert all(r["error"] is None and r["image"].shape == (8, 6, 3) and r["image"].any() for r in rows)
    assert rows[0]["source"].endswith("train-0001.tar")


@pytest.fixture
def bad_shards(tmp_path):
    good = good_samples("g", 3)
    bad = [
        ("corrupt", {"png": b"\x89PNG garbage", "cls": b"1"}),
        ("empty", {"png": b"", "cls": b"1"}),
        ("badlabel", {"png": png_bytes(9), "cls": b"cat"}),
        ("nolabel", {"png": png_bytes(8)}),
    ]
    write_tar(tmp_path / "mixed.tar", good[:1] + bad + good[1:])
    write_tar(tmp_path / "whole.tar", good_samples("w", 20))
    full = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(full[: len(full) // 2])
    return tmp_path


def check_bad_rows(rows):
    by_key = {r["key"]: r for r in rows}
    errors = {r["key"]: r["error"] for r in rows if r["error"] is not None}
    # Per-sample problems: the rest of the shard is read.
    assert errors["corrupt"].startswith("corrupt image:")
    assert errors["empty"].startswith("empty member: empty.png")
    assert errors["badlabel"].startswith("bad label:") and "cat" in errors["badlabel"]
    assert not by_key["corrupt"]["image"].any()
    assert {"g000", "g001", "g002"} <= set(by_key) and by_key["g002"]["error"] is None
    assert by_key["nolabel"]["error"] is None and by_key["nolabel"]["label"] == -1
    # The truncated shard: samples before the cut, then one row naming the shard.
    truncated = [r for r in rows if r["source"].endswith("truncated.tar")]
    shard_errors = [r for r in truncated if r["error"]]
    assert len(shard_errors) == 1 and shard_errors[0]["error"].startswith("unreadable shard:")
    assert "truncated.tar" in shard_errors[0]["error"]
    assert 5 <= len(truncated) - 1 < 20
    summary = data.summarize_errors(rows)
    assert summary["errors"] == 4
    assert summary["by_kind"] == {"corrupt image": 1, "empty member": 1, "bad label": 1, "unreadable shard": 1}
    assert {e["key"] for e in summary["examples"]} >= {"corrupt", "empty", "badlabel"}


def test_bad_samples_without_ray(bad_shards):
    rows = [r for name in ("mixed", "truncated") for r in data.iter_shard(str(bad_shards / f"{name}.tar"), 8)]
    check_bad_rows(rows)


def test_missing_shard_is_an_error_row(tmp_path):
    rows = list(data.iter_shard(str(tmp_path / "gone.tar"), 8))
    assert len(rows) == 1 and rows[0]["error"].startswith("unreadable shard:") and "gone.tar" in rows[0]["error"]


def test_holdout_rule_splits_every_shard_one_in_n_by_position(shard_dir, tmp_path):
    write_tar(tmp_path / "ten.tar", good_samples("t", 10))
    url = str(tmp_path / "ten.tar")
    keys = {part: [r["key"] for r in data.iter_shard(url, 8, holdout_every=5, part=part)]
            for part in ("all", "train", "holdout")}
    assert keys["holdout"] == ["t004", "t009"]  # positions 4 and 9
    assert keys["train"] == [k for k in keys["all"] if k not in keys["holdout"]] and len(keys["train"]) == 8
    assert [r["key"] for r in data.iter_shard(url, 8, holdout_every=0, part="holdout")] == keys["all"]
    with pytest.raises(ValueError, match="unknown split part 'test'"):
        list(data.iter_shard(url, 8, holdout_every=5, part="test"))


def test_read_shards_with_ray(ray_local, bad_shards):
    ds = read_shards(f"{bad_shards}/{{mixed,truncated}}.tar", 8, num_cpus=0.5, rows_per_batch=4)
    rows = ds.take_all()
    check_bad_rows(rows)
    assert str(ds.schema().types[ds.schema().names.index("error")]) == "string"
    assert rows[0]["image"].shape == (8, 8, 3) and rows[0]["image"].dtype == np.uint8


def test_masks_follow_images(ray_local, tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:9] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    write_tar(tmp_path / "m.tar", [("a", {"png": png_bytes(0), "mask.png": buffer.getvalue(), "cls": b"2"}), ("b", {"png": png_bytes(1)})])
    rows = {r["key"]: r for r in read_shards(str(tmp_path / "m.tar"), (10, 12), with_mask=True, num_cpus=0.5).take_all()}
    assert rows["a"]["mask"].dtype == bool and rows["a"]["mask"].sum() == 18 and rows["a"]["label"] == 2
    assert rows["b"]["error"].startswith("missing mask")


@pytest.fixture(scope="module")
def s3(s3_server):
    fs, _ = s3_server
    if not fs.exists("shards"):
        fs.mkdir("shards")
    return fs


def test_s3_urls(ray_local, s3, tmp_path):
    for s in range(3):
        write_tar(tmp_path / f"x-{s}.tar", good_samples(f"k{s}_", 3))
        s3.put(str(tmp_path / f"x-{s}.tar"), f"shards/train/x-{s}.tar")
    s3.invalidate_cache()
    expected = [f"s3://shards/train/x-{s}.tar" for s in range(3)]
    assert data.expand_urls("s3://shards/train/*.tar", filesystem=s3) == expected
    assert data.expand_urls("s3://shards/train/x-{0..1}.tar", filesystem=s3) == expected[:2]
    assert data.expand_urls("s3://shards/train", filesystem=s3) == expected
    with pytest.raises(FileNotFoundError, match="s3://shards/none"):
        data.expand_urls("s3://shards/none/*.tar", filesystem=s3)
    rows = read_shards("s3://shards/train/x-{0..2}.tar", 8, filesystem=s3, num_cpus=0.5).take_all()
    assert sorted(r["key"] for r in rows) == sorted(f"k{s}_{i:03d}" for s in range(3) for i in range(3))
    assert {r["source"] for r in rows} == set(expected) and all(r["error"] is None for r in rows)
    held = read_shards("s3://shards/train/x-{0..2}.tar", 8, filesystem=s3, num_cpus=0.5,
                            holdout_every=3, part="holdout").take_all()
    assert sorted(r["key"] for r in held) == [f"k{s}_002" for s in range(3)]  # the split holds through Ray, per shard


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"shared CIFAR-10 shards not found at {SHARED_CIFAR}")
def test_shared_cifar_shard_reads_cleanly():
    rows = []
    for row in data.iter_shard(str(SHARED_CIFAR / "test-0000.tar"), 32):
        rows.append(row)
        if len(rows) == 200:
            break
    assert all(r["error"] is None and 0 <= r["label"] < 10 and r["image"].shape == (32, 32, 3) for r in rows)
    assert len({r["key"] for r in rows}) == 200
