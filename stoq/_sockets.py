"""IPv6-only UDP sockets."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

RECEIVE_BUFFER_BYTES = 4 << 20
"""SO_RCVBUF for the UDP sockets: removes drops under bulk load (FACTS.md)."""


def make_ipv6_socket(host: str, port: int) -> socket.socket:
    """A bound, non-blocking UDP socket that accepts IPv6 only.

    :raises ValueError: ``host`` is not an IPv6 address.
    """
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address; TrustChain listens on IPv6 only"
                         ) from None
    if address.ipv4_mapped is not None:
        raise ValueError(f"{host!r} is an IPv4-mapped address; TrustChain is IPv6 only")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
