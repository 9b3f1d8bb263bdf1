"""Progress people can read, and a quiet Ray, for the jobs' drivers.

`Progress` prints one line per update on a terminal (rewritten in place) and plain lines at
most every `interval` seconds elsewhere (CI, `ray job submit` logs): done / total, the rate,
the ETA and whatever fields the caller adds. `ray_init_kwargs(verbose)` is the one place
that decides how much Ray itself says: by default only warnings and errors, from the driver
and from every worker (Ray's INFO lines, execution plans and per-report dumps are off);
`--verbose` or `L2R_LOG_LEVEL=debug` turns them back on.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
import warnings


def verbose_requested(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get("L2R_LOG_LEVEL", "").lower() in ("debug", "info", "verbose")


# Known-harmless noise of a local run, off unless verbose: Ray Data's notes ("Progress bars
# disabled", "Dataset ... finished") and Ray's own deprecation warnings about its internals. Set in
# the environment before Ray starts, so that the processes of a local Ray inherit them.
QUIET_ENVIRONMENT = {"RAY_DATA_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def ray_init_kwargs(verbose: bool = False) -> dict:
    """Keyword arguments for `ray.init` that set how much Ray logs (see the module docstring)."""
    import ray

    if verbose_requested(verbose):
        return {}
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return {"logging_config": ray.LoggingConfig(log_level="WARNING"), "logging_level": "WARNING"}


def train_logging_config(verbose: bool = False):
    """Ray Train's own log level (its INFO lines: resources, worker group, every report)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose_requested(verbose) else "WARNING")


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and execution-plan lines off (the jobs print their own progress)."""
    import ray

    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # in this process ("Progress bars disabled", ...)
    # A small input (the demo's one shard) has fewer blocks at the start than the actor pool has
    # actors; the pool still works and the blocks stream, so the warning says nothing to act on.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)


def quiet_train_reports() -> None:
    """In a Ray Train worker: drop Ray Train's "Reporting training result N: TrainingReport(...)" dump.

    Ray 2.60 logs it at INFO through a logger named after its file, which its own log-level
    setting does not reach; a filter on that logger drops it (the progress line shows the same
    figures). Ray's private module may move: then the line simply stays.
    """
    import logging

    class DropReports(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("Reporting training result")

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    if isinstance(getattr(context, "logger", None), logging.Logger):
        context.logger.addFilter(DropReports())


# Lines that Ray's C++ core writes straight to the driver's stderr (file descriptor 2, past Python's
# logging), known to be harmless for these jobs: Ray Data's and Ray Train's own actors take object
# refs as constructor arguments (ray-project/ray#53727), which nothing here can change.
NATIVE_NOISE = (re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
                           r"store and max_restarts > 0"),)
_native_filter: dict = {}


def filter_native_stderr(verbose: bool = False) -> None:
    """In a job's driver process: drop NATIVE_NOISE lines from file descriptor 2; everything else passes.

    Python's own writes go through the same pipe, in order; at exit the pipe is drained before the
    process ends, so a traceback is never lost. Called from the jobs' `__main__` only (not inside
    a test process, whose descriptors pytest swaps).
    """
    if verbose_requested(verbose) or _native_filter:
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                text = line.decode("utf-8", "replace")
                if not any(pattern.search(text) for pattern in NATIVE_NOISE):
                    os.write(original, line)

    thread = threading.Thread(target=forward, name="l2r-stderr-filter", daemon=True)
    thread.start()
    _native_filter.update(thread=thread, original=original)

    def drain():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)  # closes the pipe's last write end: the thread reads to EOF and stops
        thread.join(timeout=5)

    atexit.register(drain)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of one long stage: `update(done, **fields)`, then `close()`."""

    def __init__(self, stage: str, total: int | None, unit: str = "", interval: float = 30.0, stream=None,
                 log=None, start: float | None = None):
        """`log`: a callable taking each line instead of writing to `stream` (plain lines, never in place).
        `start`: the count at creation, where known (0 for a batch job's images of this run; a resumed
        training run does not know it): then the first update already has a rate and an ETA."""
        self.stage, self.total, self.unit, self.interval, self.start = stage, total, unit, interval, start
        self.stream = stream or sys.stdout
        self.log = log
        self.terminal = log is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.first = None  # (time, done) of the first update: the rate excludes start-up
        self.last_print = None
        self.line = ""

    def _pace(self, done: float) -> tuple[float, float] | None:
        """(seconds, items) to measure the pace over: since the first update, which leaves start-up
        out, once there is progress after it; until then since creation, where `start` is known."""
        if self.first is None:
            return None
        now = time.perf_counter()
        t0, d0 = self.first
        if done > d0 and now > t0:
            return now - t0, done - d0
        if self.start is not None and done > self.start and now > self.started:
            return now - self.started, done - self.start
        return None

    def eta(self, done: float) -> float | None:
        if self.total is None or self.first is None:
            return None
        if done >= self.total:
            return 0.0
        pace = self._pace(done)
        return None if pace is None else (self.total - done) * pace[0] / pace[1]

    def rate(self, done: float) -> float | None:
        pace = self._pace(done)
        return None if pace is None else pace[1] / pace[0]

    def format(self, done: float, fields: dict) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.stage}: {self.unit}{' ' if self.unit else ''}{done:g}{of}{share}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items() if v is not None]
        rate = self.rate(done)
        if rate is not None:
            parts.append(f"{rate:.3g} {self.unit or 'items'}/s")
        parts.append(f"elapsed {format_seconds(time.perf_counter() - self.started)}")
        parts.append(f"ETA {format_seconds(self.eta(done))}")
        return ", ".join(parts)

    def update(self, done: float, force: bool = False, **fields) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        self.line = self.format(done, fields)
        if self.terminal:
            self.stream.write("\r" + self.line + "\033[K")
            self.stream.flush()
        elif force or self.last_print is None or now - self.last_print >= self.interval or done == self.total:
            if self.log is not None:
                self.log(self.line)
            else:
                self.stream.write(self.line + "\n")
                self.stream.flush()
            self.last_print = now

    def close(self) -> None:
        if self.terminal and self.line:
            self.stream.write("\n")
            self.stream.flush()
