"""The status of a running load, shown on a terminal or written to a log.

:class:`Progress` shows one status (a phase, seconds elapsed of the total,
and the runner's one-line figures):

- on a terminal with ``tqdm`` installed: a tqdm bar over the run's seconds,
  the figures as its postfix;
- on a terminal without tqdm: one line redrawn in place, twice a second;
- on anything else (a pipe, a log file): one plain line every
  :data:`LOG_EVERY` seconds, and the last one.

Nothing is written when the stream is None.

Concurrency: used by the runner's thread only.
"""
from __future__ import annotations

import time
from typing import Any, TextIO

#: Seconds between two status lines when the stream is not a terminal.
LOG_EVERY = 5.0
#: Seconds between two redraws on a terminal.
REDRAW_EVERY = 0.5


def _tqdm() -> Any:
    """tqdm's class, or None when it is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """The status of one load run on ``stream`` (None: silent) over ``total_s`` seconds."""

    def __init__(self, stream: TextIO | None, total_s: float, label: str = "") -> None:
        self.stream = stream
        self.total_s = total_s
        self.label = label
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.bar: Any = None
        self._last = -1e9
        if self.tty:
            tqdm = _tqdm()
            if tqdm is not None:
                self.bar = tqdm(total=round(total_s, 1), file=stream, desc=label.strip() or "load",
                                bar_format="{desc} {bar} {n:.0f}/{total:.0f} s{postfix}",
                                leave=True, dynamic_ncols=True)

    def update(self, phase: str, elapsed: float, figures: str, final: bool = False) -> None:
        """Show ``phase`` (e.g. "running"), ``elapsed`` seconds and the ``figures`` line;
        ``final``: the last status (always shown; a terminal line is ended)."""
        stream = self.stream
        if stream is None:
            return
        now = time.monotonic()
        if not final and now - self._last < (REDRAW_EVERY if self.tty else LOG_EVERY):
            return
        self._last = now
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label}{phase}", refresh=False)
            self.bar.n = min(max(elapsed, 0.0), self.total_s)
            self.bar.set_postfix_str(figures, refresh=False)
            self.bar.refresh()
            if final:
                self.close()
            return
        line = f"{self.label}{phase} [{elapsed:5.1f}/{self.total_s:.0f}s] {figures}"
        if self.tty:
            stream.write("\r" + line.ljust(118)[:118] + ("\n" if final else ""))
        else:
            stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        """End the tqdm bar, if any (further updates fall back to plain lines)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
