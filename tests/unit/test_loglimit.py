"""The log limiter: a burst of lines per kind and interval, then one summary line."""

from __future__ import annotations

import asyncio
import logging

import pytest

from protocol.loglimit import LogLimiter


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lines() -> Lines:
    logger = logging.getLogger("test.loglimit")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def test_a_burst_per_kind_then_one_summary_with_the_count(lines: Lines) -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("test.loglimit"), burst=3, interval=10.0,
                         clock=lambda: now[0])
    for i in range(1000):
        limiter.info("request refused", extra={"n": i})
        limiter.warning("consensus misbehaviour")
    assert [r.getMessage() for r in lines.records] == \
        ["request refused", "consensus misbehaviour"] * 3
    assert limiter.suppressed_total == 2 * 997
    now[0] = 10.0  # the next window: the summary of the last one comes first
    limiter.info("request refused")
    messages = [r.getMessage() for r in lines.records[6:]]
    assert messages == ["request refused: 997 more in 10 s not logged", "request refused"]
    assert lines.records[6].suppressed == 997  # type: ignore[attr-defined]
    assert lines.records[6].levelno == logging.INFO


def test_disabled_levels_cost_nothing_and_count_nothing(lines: Lines) -> None:
    limiter = LogLimiter(logging.getLogger("test.loglimit"), burst=1)
    for _ in range(100):
        limiter.log(logging.DEBUG, "noise")
    assert lines.records == [] and limiter.suppressed_total == 0


async def test_the_summary_comes_when_the_interval_ends_even_if_the_flood_stopped(
        lines: Lines) -> None:
    limiter = LogLimiter(logging.getLogger("test.loglimit"), burst=2, interval=0.2)
    for _ in range(50):
        limiter.warning("DoQ connection closed")
    assert len(lines.records) == 2
    await asyncio.sleep(0.35)
    assert [r.getMessage() for r in lines.records[2:]] == \
        ["DoQ connection closed: 48 more in 0.2 s not logged"]
    assert lines.records[2].levelno == logging.WARNING
    limiter.warning("DoQ connection closed")  # a new window starts with a real line
    assert lines.records[-1].getMessage() == "DoQ connection closed"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LogLimiter(logging.getLogger("x"), burst=0)
    with pytest.raises(ValueError):
        LogLimiter(logging.getLogger("x"), interval=0)
