"""Log lines a remote peer can trigger, limited: a flood of bad input cannot fill a disk.

A refused request, a malformed frame, a DoQ protocol error or a validator's
misbehaviour is worth a log line, but each costs the sender one packet and the
node one line: 240,000 bad frames wrote 151,845 lines (issue 16). A
:class:`LogLimiter` lets the first ``burst`` lines of each kind (its message
text) through in every ``interval``; the rest are counted, and when the
interval ends one summary line says how many were left out. The summary is
written by a timer on the running event loop, so a flood that stops is still
accounted for; without a loop it is written with the next line of that kind.

Shared by ``stoq`` (transport) and ``handlers`` (consensus), so it lives here
next to the protocol that defines what a peer may send; it does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

DEFAULT_BURST = 10
"""Lines of one kind written per interval before the rest are only counted."""
DEFAULT_INTERVAL = 10.0
"""Seconds of one counting window."""


class _Window:
    __slots__ = ("level", "logged", "start", "suppressed", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0
        self.level = logging.NOTSET
        self.timer: asyncio.TimerHandle | None = None


class LogLimiter:
    """At most ``burst`` lines of each kind per ``interval`` to ``logger``; a summary
    line with the count of the others.

    :param clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = DEFAULT_BURST,
                 interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("a log limiter needs burst >= 1 and interval > 0")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self.suppressed_total = 0
        """Lines left out since start (all kinds)."""

    def log(self, level: int, message: str, *, extra: Mapping[str, Any] | None = None,
            exc_info: Any = None) -> None:
        """Write ``message`` at ``level`` unless this kind already had its burst."""
        if not self.logger.isEnabledFor(level):
            return
        now = self.clock()
        window = self._windows.get(message)
        if window is None or now - window.start >= self.interval:
            if window is not None:
                self._summarize(message, window)
            window = self._windows[message] = _Window(now)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, message, extra=extra, exc_info=exc_info)
            return
        window.suppressed += 1
        window.level = max(window.level, level)
        self.suppressed_total += 1
        if window.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            window.timer = loop.call_later(max(0.0, window.start + self.interval - now),
                                           self._window_ended, message, window)

    def info(self, message: str, **kwargs: Any) -> None:
        self.log(logging.INFO, message, **kwargs)

    def warning(self, message: str, **kwargs: Any) -> None:
        self.log(logging.WARNING, message, **kwargs)

    def error(self, message: str, **kwargs: Any) -> None:
        self.log(logging.ERROR, message, **kwargs)

    def _window_ended(self, message: str, window: _Window) -> None:
        window.timer = None
        if self._windows.get(message) is window:
            del self._windows[message]
        self._summarize(message, window)

    def _summarize(self, message: str, window: _Window) -> None:
        if window.timer is not None:
            window.timer.cancel()
            window.timer = None
        if window.suppressed:
            count, window.suppressed = window.suppressed, 0
            self.logger.log(window.level, f"{message}: {count} more in {self.interval:g} s "
                                          "not logged", extra={"suppressed": count})
