"""What the CA tells the rest of the node once a certificate exists or is revoked.

The CA stores and audits a certificate, then hands one typed event to every
publisher (DNS records, the fingerprint index and its watchers). A publisher
that fails must not turn a durable issuance into an error for the client:
:class:`Publishers` calls each one guarded, logs and counts its failures,
and reports whether every publisher handled its latest event
(``node.health``'s ``publishing`` check).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from store import CertificateRecord

log = logging.getLogger("trustchain.ca")

_Event = TypeVar("_Event")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogPosition:
    """Where the CT log holds a certificate's precertificate entry."""

    shard: int
    leaf_index: int
    log_id: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateIssued:
    """A certificate the CA issued: stored and audited before anyone hears of it."""

    record: CertificateRecord
    logged: LogPosition | None
    """Its CT entry (the SCT it carries), or None when the node runs without a log."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateRevoked:
    """A certificate the CA revoked (``record`` carries the time and reason)."""

    record: CertificateRecord


class Publisher(Protocol):
    """Something that follows the CA's certificates (DNS, fingerprints...)."""

    def certificate_issued(self, event: CertificateIssued) -> None: ...

    def certificate_revoked(self, event: CertificateRevoked) -> None: ...

    def registration_changed(self, name: str) -> None:
        """The AAAA records registered for ``name`` changed (``dns.register``)."""
        ...


@dataclass
class _Status:
    failures: int = 0
    last_error: str | None = None
    """The error of the latest event, or None if it was handled."""


class Publishers:
    """Every publisher of a node, each called guarded.

    :param publishers: ``(name, publisher)`` pairs, called in this order.
    """

    def __init__(self, publishers: Sequence[tuple[str, Publisher]] = ()) -> None:
        self._publishers = list(publishers)
        self.status = {name: _Status() for name, _ in self._publishers}

    def issued(self, event: CertificateIssued) -> None:
        for name, publisher in self._publishers:
            self._call(name, event.record.serial, publisher.certificate_issued, event)

    def revoked(self, event: CertificateRevoked) -> None:
        for name, publisher in self._publishers:
            self._call(name, event.record.serial, publisher.certificate_revoked, event)

    def registration_changed(self, name: str) -> None:
        for publisher_name, publisher in self._publishers:
            self._call(publisher_name, name, publisher.registration_changed, name)

    def _call(self, name: str, subject: str, method: Callable[[_Event], None],
              event: _Event) -> None:
        """Call one publisher guarded: a failure is counted and logged, never raised (a
        plain ``try`` rather than a context manager: every validator calls each
        publisher for every issuance)."""
        status = self.status[name]
        try:
            method(event)
        except Exception as exc:
            status.failures += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("publishing %s to %s failed", subject, name,
                          extra={"publisher": name, "subject": subject})
        else:
            status.last_error = None

    def healthy(self) -> bool:
        """Whether every publisher handled its latest event."""
        return all(s.last_error is None for s in self.status.values())

    def problem(self) -> str | None:
        """None if every publisher handled its latest event, else which did not and why
        (the ``publishing`` health check)."""
        failing = [f"{name}: {s.last_error}" for name, s in self.status.items()
                   if s.last_error is not None]
        return "; ".join(failing) or None

