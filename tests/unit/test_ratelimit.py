"""The per-prefix token bucket, with an injected clock."""

from __future__ import annotations

import pytest

from stoq import RateLimiter


def test_burst_of_one_minute_then_refill() -> None:
    limiter = RateLimiter(60)
    assert all(limiter.acquire("2001:db8::1", 0.0) == 0.0 for _ in range(60))
    wait = limiter.acquire("2001:db8::1", 0.0)
    assert wait == pytest.approx(1.0)
    assert limiter.acquire("2001:db8::1", 1.0) == 0.0


def test_same_slash64_shares_an_allowance() -> None:
    limiter = RateLimiter(2)
    assert limiter.acquire("2001:db8:0:1::1", 0) == 0.0
    assert limiter.acquire("2001:db8:0:1::2", 0) == 0.0
    assert limiter.acquire("2001:db8:0:1::3", 0) > 0
    assert limiter.acquire("2001:db8:0:2::1", 0) == 0.0  # another /64


def test_prefix_128_separates_addresses() -> None:
    limiter = RateLimiter(1, prefix_length=128)
    assert limiter.acquire("2001:db8::1", 0) == 0.0
    assert limiter.acquire("2001:db8::2", 0) == 0.0
    assert limiter.acquire("2001:db8::1", 0) > 0


def test_zero_is_unlimited() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.acquire("::1", 0) == 0.0 for _ in range(10_000))


def test_idle_buckets_are_forgotten() -> None:
    limiter = RateLimiter(10)
    for i in range(100):
        limiter.acquire(f"2001:db8:{i:x}::1", 0.0)
    assert len(limiter) == 100
    limiter.acquire("2001:db8:ffff::1", 120.0)
    assert len(limiter) == 1


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RateLimiter(-1)
    with pytest.raises(ValueError):
        RateLimiter(1, prefix_length=129)
