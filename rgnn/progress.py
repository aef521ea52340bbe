"""A small progress reporter: a bar with an ETA on a terminal, plain log lines otherwise.

The estimate of the time left is the mean time per item finished *in this run* times the items
left (items skipped because an earlier run finished them are counted as done but take no time).
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75.3 -> "1:15"``, ``3725 -> "1:02:05"``; negative or non-finite -> ``"?"``."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Report progress through ``total`` items on ``stream``.

    On a terminal (``stream.isatty()``) one line is redrawn in place::

        sweep [##########..........]  6/12  elapsed 0:31  ETA 0:29  width=256 seed=1

    otherwise every event is one line, for logs::

        sweep: 6/12 done (width=256 seed=1) in 5.1 s; elapsed 0:31, ETA 0:29

    Args:
      total: number of items.
      label: a word that starts every line.
      stream: where to write (default ``sys.stderr``).
      tty: force the terminal (``True``) or log (``False``) style; ``None`` asks the stream.
      width: characters in the bar.
      clock: a ``time.perf_counter``-like function (for tests).
    """

    def __init__(self, total, *, label="progress", stream=None, tty=None, width=24, clock=None):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total: expected a non-negative integer, got {total!r}")
        self.total = total
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.width = width
        self.clock = clock or time.perf_counter
        self.start = self.clock()
        self.done = 0
        self.timed = 0
        self.timed_seconds = 0.0

    @property
    def eta(self) -> float:
        """Seconds left, estimated from the items timed in this run (``inf`` before any)."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if self.timed == 0:
            return float("inf")
        return left * self.timed_seconds / self.timed

    def skip(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` items as done without timing them (finished by an earlier run)."""
        self.done += n
        self._emit(f"{n} already done" + (f" ({note})" if note else ""), None)

    def advance(self, seconds: float, note: str = "") -> None:
        """One item finished after ``seconds``."""
        self.done += 1
        self.timed += 1
        self.timed_seconds += seconds
        self._emit(note, seconds)

    def start_item(self, note: str = "") -> None:
        """Say which item is running (terminal only; logs get a line when it finishes)."""
        if self.tty:
            self._draw(f"running {note}")

    def close(self) -> None:
        """End the terminal line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _emit(self, note, seconds):
        if self.tty:
            self._draw(note)
            return
        elapsed = format_seconds(self.clock() - self.start)
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        what = f" ({note})" if note else ""
        self.stream.write(
            f"{self.label}: {self.done}/{self.total} done{what}{took}; "
            f"elapsed {elapsed}, ETA {format_seconds(self.eta)}\n"
        )
        self.stream.flush()

    def _draw(self, note):
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = format_seconds(self.clock() - self.start)
        line = (
            f"{self.label} [{bar}] {self.done:>{len(str(self.total))}}/{self.total}  "
            f"elapsed {elapsed}  ETA {format_seconds(self.eta)}  {note}"
        )
        self.stream.write("\r" + line[:118].ljust(118))
        self.stream.flush()
