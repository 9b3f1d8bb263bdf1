"""Progress lines: rate and ETA from the updates, plain lines off a terminal, one updating line on it."""
import io

from pipeline.progress import Progress, format_seconds


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_with_rate_and_eta(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("pipeline.progress.time.perf_counter", lambda: now[0])
    lines = []
    progress = Progress("train", 100, "step", interval=30.0, log=lines.append)
    progress.update(0, loss=1.0)  # t=0: the first line, no rate yet
    now[0] = 10.0
    progress.update(10, loss=0.5)  # within the interval: not printed
    now[0] = 20.0
    progress.update(50, force=True)  # forced (e.g. a validation)
    now[0] = 40.0
    progress.update(100)  # done is always printed
    assert len(lines) == 3
    assert lines[0].startswith("train: step 0/100 (0%), loss 1") and lines[0].endswith("ETA ?")
    assert "2.5 step/s" in lines[1] and "ETA 20s" in lines[1]  # 50 steps in 20 s: 50 more take 20 s
    assert lines[2].startswith("train: step 100/100 (100%)") and lines[2].endswith("ETA 0s")


def test_terminal_rewrites_one_line():
    stream = Terminal()
    progress = Progress("attribute", None, "images", stream=stream)
    progress.update(5)
    progress.update(9, errors=1)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "attribute: images 9, errors 1" in text


def test_format_seconds():
    assert [format_seconds(s) for s in (None, -1, 5, 65, 3725)] == ["?", "?", "5s", "1m05s", "1h02m"]


def test_a_known_start_gives_the_first_update_an_eta(monkeypatch):
    """A batch job's first update already reports a batch: with `start` known it has a pace and an ETA."""
    now = [0.0]
    monkeypatch.setattr("pipeline.progress.time.perf_counter", lambda: now[0])
    job = Progress("attribute", 5000, "images", log=[].append, start=0)
    resumed = Progress("train", 5000, "step", log=[].append)  # a resumed run's first step says nothing of pace
    now[0] = 20.0
    job.update(256)
    resumed.update(256)
    assert "12.8 images/s" in job.line and job.line.endswith("ETA 6m11s")  # 4,744 more at 12.8/s
    assert resumed.line.endswith("ETA ?")
    now[0] = 30.0
    job.update(512)  # then the pace leaves start-up out: 256 images in 10 s
    assert "25.6 images/s" in job.line and job.line.endswith("ETA 2m55s")


# ---------------------------------------------------------------- the total before decoding

def _shards(folder, count, per_shard):
    from l2r.shards import make_shards

    return make_shards(str(folder), synthetic=count, size=32, max_count=per_shard, progress=False)


def test_local_shards_are_counted_exactly_from_their_headers(tmp_path):
    from pipeline.shard_count import expected_samples

    urls = _shards(tmp_path, 50, 20)  # real tar shards of 20, 20 and 10 samples (image + mask each)
    assert expected_samples(urls) == [20.0, 20.0, 10.0]
    assert expected_samples(urls, holdout_every=3, part="holdout") == [6.0, 6.0, 3.0]  # as l2r.shard_reader.in_part
    # Past the counting budget, shards are estimated from their sizes and the bytes per sample seen.
    sizes = expected_samples(urls, count_seconds=0.0)
    assert all(abs(e - n) <= 0.15 * n for e, n in zip(sizes, (20, 20, 10))), sizes
    (tmp_path / "broken.tar").write_bytes(b"not a tar file")
    assert expected_samples(urls[:2] + [str(tmp_path / "broken.tar")]) == [20.0, 20.0, 20.0]  # the mean
    assert expected_samples([str(tmp_path / "broken.tar")]) == []


def test_a_shared_cifar10_shard_counts_5000(shared_cifar10):
    from pipeline.shard_count import expected_samples

    assert expected_samples([str(shared_cifar10 / "test-0000.tar")]) == [5000.0]


def test_remote_shards_are_estimated_from_sizes_and_one_prefix(tmp_path, s3_server, monkeypatch):
    """On S3 (a real S3 API on loopback) no shard is walked: sizes, and the first bytes of the first shard."""
    from pipeline import shard_count
    from l2r.shard_reader import expand_urls

    fs, _ = s3_server
    urls = _shards(tmp_path, 300, 100)
    if not fs.exists("counts"):
        fs.mkdir("counts")
    for url in urls:
        fs.put(url, f"counts/{url.rsplit('/', 1)[-1]}")
    fs.invalidate_cache()
    remote = expand_urls("s3://counts/*.tar", fs)
    monkeypatch.setattr(shard_count, "PREFIX_BYTES", 64 * 1024)  # a cut prefix, as for any large shard
    assert shard_count._prefix_count(fs, remote[0].removeprefix("s3://"))[0] < 100
    estimates = shard_count.expected_samples(remote, filesystem=fs)
    assert len(estimates) == 3 and all(abs(e - 100) <= 10 for e in estimates), estimates
    # Out of time at once: the first shard is sized, the others take its estimate without a request.
    assert shard_count.expected_samples(remote, filesystem=fs, count_seconds=0.0) == [estimates[0]] * 3
