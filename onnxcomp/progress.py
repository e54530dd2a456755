"""Progress on stderr for per-layer work: a bar on a terminal, nothing when piped or quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """`for x in progress.iter(items, "tucker"):` draws `tucker [#####.....] 12/40` on stderr."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def iter(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        seq = list(items) if total is None else items
        n = len(seq) if total is None else total
        start = time.perf_counter()
        for i, item in enumerate(seq):
            self._draw(desc, i, n, start)
            yield item
        self._draw(desc, n, n, start, final=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _draw(self, desc: str, i: int, n: int, start: float, final: bool = False) -> None:
        if not self.enabled or n == 0:
            return
        width = 30
        filled = int(width * i / n)
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - start
        end = "\n" if final else ""
        print(f"\r{desc} [{bar}] {i}/{n} {elapsed:5.1f}s", end=end, file=self.stream, flush=True)


QUIET = Progress(enabled=False)
