"""DNSSEC keys of the TrustChain zones: one KSK and a schedule of ZSKs, all in the keystore.

Every zone is signed with the same keys. The key-signing key (``dns-ksk``,
DNSKEY flags 257) signs the DNSKEY set; its DS records go to the parent. The
zone-signing keys (``dns-zsk-N``, flags 256) sign everything else and roll
by pre-publication (RFC 6781 §4.1.1.1, RFC 7583 §3.2):

::

    ZSK N      |--published--|=========== signing ===========|--retired--|
    ZSK N+1                  ...   |--published--|=========== signing ====...
                                   ^ retire_at(N) - prepublish

A new ZSK is published ``prepublish`` seconds before it starts signing, so
resolvers have it cached by then; the old one stays published ``prepublish``
seconds after it stopped signing, until no cached signature needs it. The
schedule is kept in a store file (``keys.json``; the private keys never leave
the keystore); :meth:`KeyRing.roll` applies it at the time it is given.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.dnssec
import dns.rdtypes.ANY.DNSKEY
from dns.dnssectypes import Algorithm

from store import JsonFile, Signer

log = logging.getLogger("trustchain.dns")

DNSSEC_ALGORITHMS = {"ed25519": Algorithm.ED25519,
                     "ecdsa-p256-sha256": Algorithm.ECDSAP256SHA256}
"""Keystore algorithm -> DNSSEC algorithm number (15 and 13)."""

FLAGS_KSK = 257
FLAGS_ZSK = 256


@dataclass
class ZoneKey:
    """One DNSSEC key and, for a ZSK, its schedule (seconds since the epoch)."""

    name: str
    """The keystore name."""
    role: Literal["ksk", "zsk"]
    created: float
    activate_at: float
    """When it starts signing."""
    retire_at: float | None = None
    """When it stops signing (ZSK only; the next ZSK takes over)."""
    remove_at: float | None = None
    """When it leaves the DNSKEY set (ZSK only)."""
    signer: Any = field(default=None, repr=False, compare=False)
    dnskey: Any = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def tag(self) -> int:
        """The DNSKEY's key tag (computed once: the key is bound before it signs)."""
        return int(dns.dnssec.key_id(self.dnskey))

    def state(self, now: float) -> str:
        if now < self.activate_at:
            return "published"
        if self.retire_at is not None and now >= self.retire_at:
            return "retired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "created": self.created,
                "activate_at": self.activate_at, "retire_at": self.retire_at,
                "remove_at": self.remove_at}


class KeyRing:
    """The KSK and the ZSK schedule.

    :param keystore: where the keys live (``get_or_create(name, algorithm)``).
    :param schedule: where the key schedule is kept.
    """

    def __init__(self, *, keystore: Any, schedule: JsonFile, algorithm: str = "ed25519",
                 zsk_lifetime: float = 30 * 86400.0, prepublish: float = 86400.0,
                 key_prefix: str = "dns") -> None:
        if algorithm not in DNSSEC_ALGORITHMS:
            raise ValueError(f"unsupported DNSSEC key algorithm {algorithm!r}")
        self.keystore = keystore
        self.schedule = schedule
        self.algorithm = algorithm
        self.zsk_lifetime = zsk_lifetime
        self.prepublish = prepublish
        self.key_prefix = key_prefix
        """Keystore names are ``PREFIX-ksk`` and ``PREFIX-zsk-N``."""
        self.ksk: ZoneKey | None = None
        self.zsks: list[ZoneKey] = []
        self._states: list[tuple[str, str]] = []
        """The keys and their states when :meth:`roll` last looked."""
        self._names_at: tuple[float, float, tuple[tuple[str, ...], str]] | None = None
        """:meth:`names_at`'s last answer and the times between which it holds."""

    @property
    def dnssec_algorithm(self) -> Algorithm:
        return DNSSEC_ALGORITHMS[self.algorithm]

    def _bind(self, key: ZoneKey) -> ZoneKey:
        signer: Signer = self.keystore.get_or_create(key.name, self.algorithm)
        key.signer = signer
        key.dnskey = dns.dnssec.make_dnskey(
            signer.public_key(), DNSSEC_ALGORITHMS[signer.algorithm],
            flags=FLAGS_KSK if key.role == "ksk" else FLAGS_ZSK)
        return key

    def load(self, now: float) -> None:
        """Read the schedule (or start one: a KSK and a first ZSK, both active now)."""
        stored = self.schedule.load()
        entries: list[dict[str, Any]] = stored["keys"] if stored else []
        keys = [self._bind(ZoneKey(**e)) for e in entries]
        self.ksk = next((k for k in keys if k.role == "ksk"), None)
        self.zsks = [k for k in keys if k.role == "zsk"]
        changed = False
        if self.ksk is None:
            self.ksk = self._bind(ZoneKey(name=f"{self.key_prefix}-ksk", role="ksk", created=now,
                                          activate_at=now))
            changed = True
        if not self.zsks:
            self.zsks.append(self._new_zsk(now, activate_at=now))
            changed = True
        if changed:
            self._save()
        self._names_at = None
        self._states = [(k.name, k.state(now)) for k in self.published(now)]

    def _new_zsk(self, now: float, *, activate_at: float) -> ZoneKey:
        number = max((int(k.name.rsplit("-", 1)[1]) for k in self.zsks), default=0) + 1
        retire_at = activate_at + self.zsk_lifetime
        key = self._bind(ZoneKey(name=f"{self.key_prefix}-zsk-{number}", role="zsk", created=now,
                                 activate_at=activate_at, retire_at=retire_at,
                                 remove_at=retire_at + self.prepublish))
        log.info("DNSSEC ZSK created", extra={"key": key.name, "tag": key.tag,
                                              "activate_at": activate_at})
        return key

    def _save(self) -> None:
        keys = [self.ksk, *self.zsks] if self.ksk else list(self.zsks)
        body = {"algorithm": self.algorithm, "keys": [k.to_json() for k in keys]}
        self.schedule.save(body)

    def roll(self, now: float) -> bool:
        """Apply the schedule at ``now``: publish, activate, retire and remove ZSKs.

        :returns: whether the DNSKEY set or the signing key changed.
        """
        changed = False
        last = self.zsks[-1]
        assert last.retire_at is not None
        if now >= last.retire_at - self.prepublish:
            # the successor, signing from the moment the last one retires (or now,
            # after a long stop)
            self.zsks.append(self._new_zsk(now, activate_at=max(last.retire_at, now)))
            changed = True
        kept = [k for k in self.zsks if k.remove_at is None or k.remove_at > now
                or k is self.zsks[-1]]
        if len(kept) != len(self.zsks):
            self.zsks = kept
            changed = True
        if changed:
            self._save()
            self._names_at = None
        states = [(k.name, k.state(now)) for k in self.published(now)]
        changed = changed or states != self._states
        self._states = states
        return changed

    def published(self, now: float) -> list[ZoneKey]:
        """The keys in the DNSKEY set at ``now``: the KSK, then the ZSKs."""
        assert self.ksk is not None
        return [self.ksk] + [k for k in self.zsks if k.remove_at is None or now < k.remove_at]

    def names_at(self, now: float) -> tuple[tuple[str, ...], str]:
        """The names of the keys :meth:`published` at ``now`` and of the :meth:`signing_zsk`:
        worked out again only when ``now`` leaves the span of the schedule it was worked out
        in (or the keys changed), since every zone update compares them."""
        cached = self._names_at
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        times = sorted({t for k in self.zsks for t in (k.activate_at, k.retire_at, k.remove_at)
                        if t is not None})
        since = max((t for t in times if t <= now), default=float("-inf"))
        until = min((t for t in times if t > now), default=float("inf"))
        names = (tuple(k.name for k in self.published(now)), self.signing_zsk(now).name)
        self._names_at = (since, until, names)
        return names

    def signing_zsk(self, now: float) -> ZoneKey:
        """The ZSK that signs at ``now`` (the newest active one)."""
        active = [k for k in self.zsks if k.state(now) == "active"]
        if active:
            return active[-1]
        started = [k for k in self.zsks if k.activate_at <= now]
        return started[-1] if started else self.zsks[0]
