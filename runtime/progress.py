"""Progress that shows in log files too: a terminal bar plus a log line at least every ``every_s``."""
from __future__ import annotations

import logging
import time

from tqdm import tqdm


class LoggedProgress(tqdm):
    """A tqdm bar (quiet off a terminal) that also logs ``desc: n/total, rate, time left`` periodically.

    A user reading a log file of a long step (DDPM training, sampling, data generation) sees
    where it is at least every ``every_s`` seconds, not minutes of silence.
    """

    def __init__(self, *args, logger: logging.Logger, every_s: float = 30.0, status=None, **kwargs):
        kwargs.setdefault("disable", None)
        kwargs.setdefault("leave", False)
        self._logger, self._every_s, self._label = logger, every_s, kwargs.get("desc") or "progress"
        self._status = status  # optional () -> str added to the log line and the bar (e.g. "3 dropped")
        total = kwargs.get("total")
        if total is None and args and hasattr(args[0], "__len__"):
            total = len(args[0])
        self._total = total
        self._t0 = self._t_logged = time.perf_counter()
        super().__init__(*args, **kwargs)
        # tqdm with disable=True never calls update(); count ourselves in that case
        self._done = 0

    def update(self, n: float = 1):
        self._done += n
        now = time.perf_counter()
        if now - self._t_logged >= self._every_s:
            self._t_logged = now
            rate = self._done / (now - self._t0)
            left = f", about {(self._total - self._done) / rate:.0f} s left" if self._total and rate > 0 else ""
            extra = f"; {self._status()}" if self._status else ""
            self._logger.info("%s: %d/%s (%.2f/s%s%s)", self._label, self._done, self._total or "?", rate, left, extra)
        if self._status and not self.disable:
            self.set_postfix_str(self._status(), refresh=False)
        return super().update(n)

    def __iter__(self):
        # tqdm's own iterator bypasses update() (and yields nothing to count when disabled)
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()
