"""Peak resident-memory growth of a block of code, sampled from /proc/self/statm.

    with RssPeak() as rss:
        work()
    rss.extra   # largest RSS seen during the block minus the RSS at its start (bytes)

A background thread reads the resident page count every `interval` seconds (and once
more at exit), so a short-lived spike between two samples can be missed; the tensors
this is used for (weight-sync buffers) live for a whole layer's collectives, far longer
than the interval. Unlike getrusage's ru_maxrss, it measures growth from the start of
the block, whatever the process's high-water mark was before it. Linux only.
"""

from __future__ import annotations

import os
import threading
import time

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class RssPeak:
    """Context manager: `extra` = the block's largest RSS growth (bytes); see module doc."""

    def __init__(self, interval: float = 2e-4):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssPeak:
        self.base = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)
