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
