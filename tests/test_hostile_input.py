"""Hostile input: what each kind gets (the table in the README's reliability section; one test a row).

No Ray here: the reading functions the jobs use are called directly.
"""

import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from l2r.images import ImageDecodeError, decode_image
from l2r.shard_reader import MAX_MEMBER_BYTES, expand_urls, iter_shard
from tests.helpers import png_bytes, write_tar
from tests.test_report import results  # noqa: F401  (a fixture: a results folder made without Ray)

SIZE = 16


def rows(path, **kwargs):
    return list(iter_shard(str(path), SIZE, **kwargs))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header announcing width x height 8-bit gray, with one tiny zlib stream
    of zero rows: a few hundred bytes that would decode to width * height bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()  # the rest is missing
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    # 8000 x 8000 = 64M pixels: under Pillow's own limit (89M), over ours (40M).
    with pytest.raises(ImageDecodeError, match=r"image too large: 8000x8000 pixels announced, at most 40000000"):
        decode_image(png_header_only(8000, 8000))
    with pytest.raises(ImageDecodeError, match=r"image too large: .*900000000 pixels"):  # Pillow's own check
        decode_image(png_header_only(30000, 30000))
    write_tar(tmp_path / "bomb.tar", [("bomb", {"png": png_header_only(8000, 8000), "cls": b"1"}),
                                      ("fine", {"png": png_bytes(1), "cls": b"2"})])
    bomb, fine = rows(tmp_path / "bomb.tar")
    assert "corrupt image: image too large: 8000x8000" in bomb["error"] and fine["error"] is None


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


def test_a_pickle_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path):
    from l2r.classifier import read_state_dict

    payload = RunsCode()
    payload.witness = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": payload}, f)
    torch_pickle = tmp_path / "evil-torch.pt"
    torch.save({"weight": payload}, torch_pickle)
    for checkpoint in (path, torch_pickle):
        with pytest.raises(Exception, match=str(checkpoint.name)):
            read_state_dict(checkpoint)
    assert not payload.witness.exists()


def test_a_yaml_config_with_python_tags_is_refused_and_runs_nothing(tmp_path):
    from pipeline import config as C

    witness = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  steps: !!python/object/apply:os.system ['touch {witness}']\n")
    with pytest.raises(yaml.constructor.ConstructorError, match=r"python/object/apply:os\.system(.|\n)*evil\.yaml"):
        C.load_config(config)
    with pytest.raises(yaml.constructor.ConstructorError):
        C.load_config(None, [f"train.steps=!!python/object/apply:os.system ['touch {witness}']"])
    assert not witness.exists()


def test_tar_members_with_absolute_or_parent_names_are_read_as_data_and_never_extracted(tmp_path, monkeypatch):
    shard = tmp_path / "shard" / "names.tar"
    shard.parent.mkdir()
    write_tar(shard, [("/tmp/l2r-absolute", {"png": png_bytes(1), "cls": b"1"}),
                      ("../../escaped", {"png": png_bytes(2), "cls": b"2"})])
    monkeypatch.chdir(shard.parent)
    before = sorted(p for p in tmp_path.rglob("*"))
    read = rows(shard)
    assert [r["key"] for r in read] == ["/tmp/l2r-absolute", "../../escaped"]  # kept as text (escaped in reports)
    assert all(r["error"] is None for r in read)
    assert sorted(p for p in tmp_path.rglob("*")) == before and not Path("/tmp/l2r-absolute.png").exists()


def test_symlinks_and_hard_links_inside_a_shard_are_per_sample_errors(tmp_path):
    shard = tmp_path / "links.tar"
    members = [("good.png", png_bytes(1), None), ("good.cls", b"1", None),
               ("soft.png", None, (tarfile.SYMTYPE, "/etc/passwd")),
               ("hard.cls", b"2", None), ("hard.png", None, (tarfile.LNKTYPE, "good.png"))]
    with tarfile.open(shard, "w") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    good, soft, hard = rows(shard)
    assert good["error"] is None
    assert "symbolic link not followed: soft.png -> /etc/passwd" in soft["error"]
    assert "hard link not followed: hard.png -> good.png" in hard["error"]


def test_a_member_announcing_several_gigabytes_is_not_read(tmp_path):
    shard = tmp_path / "huge.tar"
    huge = tarfile.TarInfo("huge.png")
    huge.size = 5 * 1024**3  # announced; the data is not there
    with open(shard, "wb") as f:
        f.write(huge.tobuf(format=tarfile.PAX_FORMAT))
        f.write(b"\0" * 4096)
    (row,) = rows(shard)
    assert f"member too large: huge.png announces {5 * 1024**3} bytes (at most {MAX_MEMBER_BYTES})" in row["error"]
    assert row["key"] == "huge"


def test_a_file_that_is_not_a_tar_is_an_error_row_naming_it(tmp_path):
    shard = tmp_path / "notatar.tar"
    shard.write_bytes(b"%PDF-1.7 this is not a tar archive" * 40)
    (row,) = rows(shard)
    assert row["error"].startswith(f"unreadable shard: {shard}: ReadError")


def test_a_glob_that_matches_nothing_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no shards match .*nothing-\*\.tar"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_labels_negative_or_far_out_of_range(tmp_path):
    from pipeline.attributor import Attributor

    write_tar(tmp_path / "labels.tar", [("negative", {"png": png_bytes(1), "cls": b"-3"}),
                                        ("huge", {"png": png_bytes(2), "cls": b"99999999999999999999999"}),
                                        ("beyond", {"png": png_bytes(3), "cls": b"4000"}),
                                        ("fine", {"png": png_bytes(4), "cls": b"3"})])
    negative, huge, beyond, fine = rows(tmp_path / "labels.tar")
    assert "bad label: not a non-negative integer: '-3'" in negative["error"]
    assert "bad label: out of range: 99999999999999999999999" in huge["error"]
    assert beyond["error"] is None and beyond["label"] == 4000  # a valid integer: the model decides
    # Explaining the labelled class: a label the target has no class for is a per-sample error.
    from l2r.classifier import build_target

    target = build_target("timm:test_resnet", model_kwargs={"num_classes": 10}, random_init=True,
                          input_size=(SIZE, SIZE))
    torch.save(target.net.state_dict(), tmp_path / "target.pt")
    from pipeline.attribute_config import AttributeConfig

    cfg = AttributeConfig(shards=str(tmp_path / "labels.tar"), output=str(tmp_path / "out"),
                          target={"spec": "timm:test_resnet", "checkpoint": str(tmp_path / "target.pt"),
                                  "kwargs": {"num_classes": 10}, "input_size": (SIZE, SIZE)},
                          methods=["random"], protocol={"target": "ground_truth"})
    attributor = Attributor(cfg, {"device": "cpu", "threads": 1, "forward_batch": 8, "fast_path": "eager"})
    batch_rows = [beyond, fine]
    batch = {k: np.array([r[k] for r in batch_rows], dtype=object) for k in ("key", "source", "error")}
    batch["image"] = np.stack([r["image"] for r in batch_rows])
    batch["label"] = np.array([r["label"] for r in batch_rows])
    out = attributor(batch).to_pylist()
    assert out[0]["error"] == "label 4000 out of range: the target has 10 classes"
    assert out[1]["error"] is None and out[1]["target"] == 3


def test_a_mask_of_another_size_than_its_image_is_a_per_sample_error(tmp_path):
    from PIL import Image

    def mask_png(size):
        buffer = io.BytesIO()
        Image.fromarray(np.full(size, 255, np.uint8)).save(buffer, format="PNG")  # size: (height, width)
        return buffer.getvalue()

    write_tar(tmp_path / "masks.tar", [("other", {"png": png_bytes(1, (10, 12)), "mask.png": mask_png((20, 20)), "cls": b"1"}),
                                       ("same", {"png": png_bytes(2, (10, 12)), "mask.png": mask_png((10, 12)), "cls": b"1"})])
    other, same = rows(tmp_path / "masks.tar", with_mask=True)
    assert "mask size 20x20 differs from the image's 12x10: other.mask.png" in other["error"]
    assert same["error"] is None and same["mask"].all()


def test_an_explainer_whose_weights_changed_after_it_was_written_is_refused_naming_the_file(tmp_path):
    from l2r.classifier import build_target
    from l2r.explainer import WEIGHTS_FILE, build_explainer, load_explainer, save_explainer

    target = build_target("timm:test_resnet", model_kwargs={"num_classes": 10}, random_init=True,
                          input_size=(SIZE, SIZE))
    explainer = build_explainer({"backbone": "target", "layers": ["layer1"], "dim": 8, "head_dim": 8}, target=target)
    folder = save_explainer(tmp_path / "explainer", explainer)
    load_explainer(folder, target)  # as written: loads
    from safetensors.torch import load_file, save_file

    weights = folder / WEIGHTS_FILE
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1.0  # altered, same keys and shapes: only the checksum can tell
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{weights}: its sha256 differs .*changed after the artifact was written"):
        load_explainer(folder, target)


def test_every_shipped_explainer_records_its_weights_checksum():
    """The shipped explainers are checked like any artifact: each records its weights' sha256."""
    import json

    from l2r.artifact import SHIPPED
    from l2r.classifier import sha256_file
    from l2r.explainer import CONFIG_FILE, WEIGHTS_FILE

    folders = sorted(p for p in SHIPPED.iterdir() if (p / CONFIG_FILE).is_file())
    assert folders
    for folder in folders:
        recorded = json.loads((folder / CONFIG_FILE).read_text())["file_sha256"][WEIGHTS_FILE]
        assert recorded == sha256_file(folder / WEIGHTS_FILE), folder.name


def test_keys_and_class_names_with_html_are_escaped_in_the_report(results, tmp_path):
    """Keys and class names come from the data: in the report they are text, never markup."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from l2r.reporting import report as rep
    from l2r.results import SCHEMA

    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    shards = tmp_path / "shards"
    hostile_key = '<script>alert("key")</script>'
    hostile_class = '<img src=x onerror=alert("class")>'
    for f in sorted((copy / "parquet").glob("*.parquet")):
        df = pq.read_table(f).to_pandas()
        source = Path(df.source.iloc[0])
        if not shards.exists():
            shutil.copytree(source.parent, shards)
            names = json.loads((shards / "classes.json").read_text())
            (shards / "classes.json").write_text(json.dumps({k: f"{hostile_class}{v}" for k, v in names.items()}))
        df["source"] = [str(shards / Path(s).name) for s in df.source]
        df["key"] = [f"{hostile_key}{k}" for k in df.key]
        pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), f)
    built = rep.write_report(rep.ReportConfig(results=str(copy), gallery=2), log=lambda line: None)
    page = Path(built["files"]["report.html"]).read_text()
    assert "&lt;script&gt;alert(&quot;key&quot;)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(&quot;class&quot;)&gt;" in page and "<img src=x" not in page
    for name, path in built["files"].items():
        if name.endswith((".md", ".json")):
            text = Path(path).read_text()
            assert "<script>alert" not in text or name.endswith(".json"), name  # JSON holds the text as data
