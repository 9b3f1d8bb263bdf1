"""The shipped run configs load, and the ImageNet one keeps its validation shards out of training."""
from pathlib import Path

import pytest

from l2r.shard_reader import expand_urls
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    config = load_config(path)
    assert config["name"] == path.stem


def test_imagenet_mobilenet_holds_back_whole_shards():
    config = load_config(REPO / "jobs" / "configs" / "imagenet-mobilenet.yaml")
    if not (REPO.parent / "shared" / "data" / "duts").is_dir():
        pytest.skip("../shared/data/duts is absent")
    train, val = expand_urls(config["data"]["train"]), expand_urls(config["data"]["val"])
    assert len(train) == 11 and len(val) == 2
    assert not set(train) & set(val)
    assert config["explainer"]["condition"] == "classifier"
