"""The driver's progress line of a training run: rank 0 writes its latest report to the run's
`progress.json`; the driver polls it from a thread (the workers' own output is Ray's)."""

from __future__ import annotations

import json

from l2r import storage as l2r_storage
from pipeline.config import storage_options
from pipeline.progress import Progress

PROGRESS_FILE = "progress.json"  # the latest report, read by the driver's progress line


def write_progress(config: dict, metrics: dict, total: int) -> None:
    """Rank 0, at each report: the latest metrics for the driver's line."""
    l2r_storage.write_text(f"{config['run_dir']}/{PROGRESS_FILE}", json.dumps({**metrics, "total": total}),
                           storage_options(config))


class ProgressWatcher:
    """The driver's progress line: polls the progress file rank 0 writes at every report."""

    FIELDS = {"loss": "loss", "auc_desc": "soft del", "auc_asc": "soft ins", "val_deletion_auc": "val del",
              "val_insertion_auc": "val ins", "images_per_s": "img/s"}

    def __init__(self, url: str, total: int, poll_seconds: float = 1.0, options: dict | None = None):
        import threading

        self.url, self.poll_seconds, self.options = url, poll_seconds, options
        self.progress = Progress("train", total, "step", interval=30.0)
        self.seen = None
        self.stopped = threading.Event()
        self._remove_stale()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _remove_stale(self):
        l2r_storage.remove(self.url, self.options)  # a resumed run's old file would look like progress

    def _read(self) -> dict | None:
        try:
            return l2r_storage.read_json(self.url, self.options)
        except OSError:
            return None

    def _watch(self):
        while not self.stopped.wait(self.poll_seconds):
            self._show()

    def _show(self):
        report = self._read()
        if report is None or report.get("step") == self.seen:
            return
        self.seen = report["step"]
        fields = {label: report.get(key) for key, label in self.FIELDS.items()}
        fields["img/s"] = round(fields["img/s"], 1) if fields["img/s"] is not None else None
        self.progress.update(report["step"], force="val_deletion_auc" in report, **fields)

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=5)
        self._show()
        self.progress.close()
