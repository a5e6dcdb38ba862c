"""Progress of a long loop, readable wherever it goes: on a terminal one line redrawn in place
(a carriage return, no colours); in a log file or a CI page a plain line every tenth of the
way and at the end. Rates are measured over the real time between updates, so a step of
300 ms reads 0.30 s/step."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Bar:
    def __init__(self, total: int, unit: str = "step", label: str = "",
                 stream: TextIO | None = None):
        self.total, self.unit, self.label = max(1, int(total)), unit, label
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.start, self.next_line = 0, time.perf_counter(), 0.1
        self.values: dict = {}

    def add(self, k: int, **values) -> None:
        self.update(self.done + k, **values)

    def update(self, done: int, **values) -> None:
        self.done = min(int(done), self.total)
        self.values.update(values)
        frac = self.done / self.total
        if self.tty:
            self.stream.write("\r" + self.line())
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif frac >= self.next_line or self.done >= self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            while self.next_line <= frac:
                self.next_line += 0.1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        per = (f"{1 / rate:.2f} s/{self.unit}" if 0 < rate < 1 else
               f"{rate:,.0f} {self.unit}s/s" if rate else "")
        extra = "".join(f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}"
                        for k, v in self.values.items())
        left = (self.total - self.done) / rate if rate else 0.0
        head = f"{self.label}  " if self.label else ""
        return (f"{head}{self.done:,}/{self.total:,} {self.unit}s  {elapsed:.0f}s elapsed"
                f"{f', {left:.0f}s left' if self.done < self.total and rate else ''}  {per}"
                f"{extra}")
