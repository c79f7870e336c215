"""Progress of a benchmark run: a tqdm bar when tqdm is installed and stderr is a terminal,
else one ``[k/n]`` line per finished step on stdout (logs stay readable)."""

from __future__ import annotations

import contextlib
import sys
import time


class _BarWriter:
    """A stdout stand-in that prints whole lines above the bar (``tqdm.write``)."""

    def __init__(self, tqdm, stream):
        self.tqdm, self.stream, self.buffer = tqdm, stream, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        if self.buffer:
            self.tqdm.write(self.buffer, file=self.stream)
            self.buffer = ""
        self.stream.flush()


class Progress(contextlib.AbstractContextManager):
    """``with Progress(total) as p: ... p.step("label")``; ``enabled=False`` is silent."""

    def __init__(self, total: int, enabled: bool = True, unit: str = "case"):
        self.total, self.enabled, self.unit = total, enabled, unit
        self.done = 0
        self.bar = None
        self._redirect = None
        self._started = time.perf_counter()
        self._last = self._started

    def __enter__(self):
        if not self.enabled or self.total <= 0:
            return self
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None and sys.stderr.isatty():
            self.bar = tqdm(total=self.total, unit=self.unit, file=sys.stderr)
            self._redirect = contextlib.redirect_stdout(_BarWriter(tqdm, sys.stdout))
            self._redirect.__enter__()
        return self

    def step(self, label: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled and self.total > 0:
            print(f"[{self.done}/{self.total}] {label} ({now - self._last:.1f} s)", flush=True)
        self._last = now

    def __exit__(self, *exc):
        if self._redirect is not None:
            sys.stdout.flush()
            self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()
        return False
