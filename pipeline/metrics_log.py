"""A run's `metrics.jsonl`: one line per report, on any storage."""

from __future__ import annotations

import json
import os
import time

from l2r import storage as l2r_storage
from pipeline.config import storage_options


class MetricsLog:
    """<run_dir>/metrics.jsonl, one line per report, written by rank 0. Locally it is appended to;
    object stores cannot append, so there the whole file is rewritten at each report (it is small).
    A resumed run keeps the lines up to its checkpoint's step: the steps after it are trained again."""

    def __init__(self, config: dict, start_step: int):
        self.url, self.options = f"{config['run_dir']}/metrics.jsonl", storage_options(config)
        self.append_locally = not l2r_storage.is_url(self.url)
        self.lines = []
        if not self.append_locally:
            try:
                text = l2r_storage.read_bytes(self.url, self.options).decode()
            except FileNotFoundError:
                text = ""
            self.lines = [line for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= start_step]

    def append(self, metrics: dict) -> None:
        line = json.dumps({**metrics, "time": time.time()})
        if self.append_locally:
            os.makedirs(os.path.dirname(self.url), exist_ok=True)
            with open(self.url, "a") as f:
                f.write(line + "\n")
            return
        self.lines.append(line)
        l2r_storage.write_text(self.url, "\n".join(self.lines) + "\n", self.options)
