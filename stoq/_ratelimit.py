"""Per-client request rate limiting: a token bucket per address prefix."""

from __future__ import annotations

import ipaddress


class RateLimiter:
    """Allow ``per_minute`` requests a minute per client, with a minute's burst (or
    ``burst`` tokens).

    Clients are keyed by the first ``prefix_length`` bits of their IPv6
    address (64 by default: one end site gets one allowance, not one per
    address it can pick). ``per_minute = 0`` turns the limiter off. Time is
    passed in, so the limiter is testable without sleeping.
    """

    __slots__ = ("_buckets", "_keys", "_last_prune", "capacity", "per_minute", "prefix_length",
                 "rate")

    def __init__(self, per_minute: int, prefix_length: int = 64, *,
                 burst: float | None = None) -> None:
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        if not 0 <= prefix_length <= 128:
            raise ValueError("prefix_length must be within 0..128")
        self.per_minute = per_minute
        self.prefix_length = prefix_length
        self.capacity = float(per_minute if burst is None else burst)
        self.rate = per_minute / 60.0
        self._buckets: dict[int, list[float]] = {}  # key -> [tokens, updated_at]
        self._keys: dict[str, int] = {}
        self._last_prune = 0.0

    def key(self, address: str) -> int:
        key = self._keys.get(address)
        if key is None:
            value = int(ipaddress.IPv6Address(address.split("%", 1)[0]))
            key = value >> (128 - self.prefix_length) if self.prefix_length else 0
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[address] = key
        return key

    def acquire(self, address: str, now: float) -> float:
        """Take one request's token for ``address`` at time ``now``.

        :returns: 0.0 if allowed, else the seconds until a token is available.
        """
        if self.per_minute == 0:
            return 0.0
        key = self.key(address)
        bucket = self._buckets.get(key)
        if bucket is None:
            if now - self._last_prune > 60.0:
                self._prune(now)
            bucket = self._buckets[key] = [self.capacity, now]
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        # A bucket untouched for a minute is full again (a burst holds at most a
        # minute's allowance): forgetting it is exact.
        self._last_prune = now
        stale = [k for k, (_, at) in self._buckets.items() if now - at >= 60.0]
        for k in stale:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
