"""Memory of the running process as the kernel reports it: the one reader for every benchmark (imported as
``_memory``: the script's folder is on ``sys.path``; a fresh-process snippet puts it there itself).

    >>> with PeakMemory() as mem:
    ...     load()
    >>> mem.peak_rss - mem.base_rss, mem.peak_anon - mem.base_anon     # MiB: all resident pages, private pages

``VmHWM`` (the kernel's peak of ``VmRSS``) counts every resident page, memory-mapped file pages included;
``RssAnon`` counts private memory only, what the kernel cannot reclaim. The kernel keeps no peak of the second,
so it is sampled. Linux only: both come from ``/proc/self``.
"""

from __future__ import annotations

import threading


def status_mib(key: str) -> float:
    """One ``/proc/self/status`` field in MiB, e.g. ``status_mib("VmRSS:")``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def reset_peak() -> None:
    """Set the kernel's peak-RSS mark (``VmHWM``) to the current RSS, so the next peak is the block's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak ``VmHWM`` (kernel) and peak ``RssAnon`` from entering the block on, in MiB.

    ``sample_s`` is how often a thread samples ``RssAnon``; ``None`` reads it at the start and the end only (no
    thread to share the interpreter with a timed block).
    """

    def __init__(self, sample_s: float | None = 0.005) -> None:
        self.sample_s = sample_s

    def __enter__(self) -> PeakMemory:
        reset_peak()
        self.base_rss, self.base_anon = status_mib("VmRSS:"), status_mib("RssAnon:")
        self.peak_anon, self._done = self.base_anon, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if self.sample_s else None
        if self._thread:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.sample_s):
            self.peak_anon = max(self.peak_anon, status_mib("RssAnon:"))

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread:
            self._thread.join()
        self.peak_anon = max(self.peak_anon, status_mib("RssAnon:"))
        self.peak_rss = status_mib("VmHWM:")
