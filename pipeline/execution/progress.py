"""Progress of a sweep: a live bar for terminals, a periodic one-line summary for logs.

A cluster job's log has no terminal, so besides the tqdm bar (done/total, rate,
ETA, failures, live workers) a line like ``progress 120/1000 (12.0%) 2.10 units/s
ETA 6m59s failed 0 workers 7/8 elapsed 1m00s`` goes to the log every
``log_every_s`` seconds and once at the end.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("pipeline.progress")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    def __init__(self, total: int, log_every_s: float = 30.0, bar: bool = True):
        self.total = total
        self.done = 0
        self.failed = 0
        self.workers: tuple[int, int] | None = None  # (live, all)
        self.log_every_s = log_every_s
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr,
                         disable=not bar or None, smoothing=0.1)

    def update(self, done: int, failed: int, workers: tuple[int, int] | None = None) -> None:
        """``workers``: (live, all) workers of the pool, shown as ``workers 1/2``."""
        progressed = done != self.done or failed != self.failed
        if progressed or (workers is not None and workers != self.workers):
            self._bar.update(done + failed - self.done - self.failed)
            self.done, self.failed = done, failed
            if workers is not None:
                self.workers = workers
            postfix = {"failed": failed}
            if self.workers is not None:
                postfix["workers"] = f"{self.workers[0]}/{self.workers[1]}"
            self._bar.set_postfix(postfix, refresh=not progressed)
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info(self.summary())

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        finished = self.done + self.failed
        rate = finished / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - finished) / rate) if rate > 0 else "?"
        share = 100.0 * finished / self.total if self.total else 100.0
        workers = f"workers {self.workers[0]}/{self.workers[1]} " if self.workers is not None else ""
        return (f"progress {finished}/{self.total} ({share:.1f}%) {rate:.2f} units/s ETA {eta} "
                f"failed {self.failed} {workers}elapsed {_duration(elapsed)}")

    def close(self) -> None:
        self._bar.close()
        log.info(self.summary())
