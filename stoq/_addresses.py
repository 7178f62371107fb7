"""Connections per client address: how many one address and one prefix may hold, and
how fast one address may open new ones.

A global connection limit alone lets one client take every slot (one address
holding all of them locks everybody else out); these limits keep a share for
everyone else. Addresses are IPv6 (the server refuses anything else first).
"""

from __future__ import annotations

import ipaddress

from ._ratelimit import RateLimiter


def _address_value(address: str) -> int:
    return int(ipaddress.IPv6Address(address.split("%", 1)[0]))


class AddressLimits:
    """Count connections per address and per prefix; refuse what is over a limit.

    ``per_address`` and ``per_prefix`` bound the open connections of one address and
    of one ``prefix_length``-bit prefix (0 turns a bound off); ``handshakes_per_second``
    bounds how fast one address may open connections (a token bucket holding one
    second's allowance; 0 is unlimited).
    """

    def __init__(self, *, per_address: int, per_prefix: int, prefix_length: int,
                 handshakes_per_second: float) -> None:
        if per_address < 0 or per_prefix < 0 or handshakes_per_second < 0:
            raise ValueError("connection limits must be 0 (off) or more")
        if not 0 <= prefix_length <= 128:
            raise ValueError("prefix_length must be within 0..128")
        self.per_address = per_address
        self.per_prefix = per_prefix
        self.prefix_length = prefix_length
        self.handshakes_per_second = handshakes_per_second
        self._addresses: dict[int, int] = {}
        self._prefixes: dict[int, int] = {}
        self._handshakes = (RateLimiter(round(handshakes_per_second * 60), 128,
                                        burst=max(1.0, handshakes_per_second))
                            if handshakes_per_second else None)
        self.refused = 0

    def admit(self, address: str, now: float) -> tuple[int, int] | str:
        """Count a new connection from ``address``: its key for :meth:`release`, or why
        it is refused (the reason the client reads in the CONNECTION_CLOSE)."""
        value = _address_value(address)
        prefix = value >> (128 - self.prefix_length) if self.prefix_length else 0
        reason = None
        if self._handshakes is not None and self._handshakes.acquire(address, now) > 0:
            reason = (f"too many new connections from this address (limit "
                      f"{self.handshakes_per_second:g} a second)")
        elif self.per_address and self._addresses.get(value, 0) >= self.per_address:
            reason = f"too many connections from this address (limit {self.per_address})"
        elif self.per_prefix and self._prefixes.get(prefix, 0) >= self.per_prefix:
            reason = (f"too many connections from this /{self.prefix_length} "
                      f"(limit {self.per_prefix})")
        if reason is not None:
            self.refused += 1
            return reason
        self._addresses[value] = self._addresses.get(value, 0) + 1
        self._prefixes[prefix] = self._prefixes.get(prefix, 0) + 1
        return value, prefix

    def release(self, key: tuple[int, int]) -> None:
        """A connection :meth:`admit` counted has ended."""
        value, prefix = key
        for table, item in ((self._addresses, value), (self._prefixes, prefix)):
            left = table.get(item, 0) - 1
            if left > 0:
                table[item] = left
            else:
                table.pop(item, None)

    def connections_from(self, address: str) -> int:
        return self._addresses.get(_address_value(address), 0)

    def __len__(self) -> int:
        """Addresses holding a connection now."""
        return len(self._addresses)
