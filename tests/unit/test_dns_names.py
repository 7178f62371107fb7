"""The zones' owner names (``handlers.dns._names``) against dnspython's: made from text
without dnspython's parser when the text needs none, they must be the same names (labels,
equality, hash, text, errors), and hash once."""

from __future__ import annotations

import copy
import pickle

import dns.exception
import dns.name
import pytest

from handlers.dns._names import OwnerName, absolute, folded, prefixed, spelled, within

TEXTS = ["www.trust", "www.trust.", "Www.Trust", "a-b_c.x", "trust", "_443._quic.x.trust",
         "x" * 63 + ".trust", "*.x.trust", "é.trust", "a\\.b.trust", "a b.trust", "",
         ".", "xn--9ca.trust", "-x-.trust", "a\\065.trust"]
BAD = ["a..b", ".a", "x" * 64 + ".trust", ".".join(["a" * 63] * 4), "a\\1"]


@pytest.mark.parametrize("text", TEXTS)
def test_absolute_is_dnspythons_name(text: str) -> None:
    expected = dns.name.from_text(text.rstrip(".") + ".")
    name = absolute(text)
    assert isinstance(name, OwnerName)
    assert name.labels == expected.labels and name == expected and expected == name
    assert hash(name) == hash(expected)
    assert {expected: 1}[name] == 1 and {name: 1}[expected] == 1
    assert spelled(name, text) == expected.to_text(omit_final_dot=True)
    assert name.to_wire() == expected.to_wire() and name.to_text() == expected.to_text()


@pytest.mark.parametrize("text", BAD)
def test_absolute_refuses_what_dnspython_refuses(text: str) -> None:
    with pytest.raises(dns.exception.DNSException) as expected:
        dns.name.from_text(text.rstrip(".") + ".")
    with pytest.raises(type(expected.value)):
        absolute(text)


def test_an_owner_name_is_an_immutable_name_that_survives_copies() -> None:
    name = prefixed((b"_443", b"_quic"), absolute("WWW.trust"))
    assert name == dns.name.from_text("_443._quic.www.trust.")
    assert hash(name) == hash(dns.name.from_text("_443._quic.www.trust."))
    with pytest.raises(TypeError):
        name.labels = ()  # type: ignore[misc]
    for other in (pickle.loads(pickle.dumps(name)), copy.copy(name), copy.deepcopy(name)):
        assert other == name and hash(other) == hash(name)


def test_within_is_is_subdomain() -> None:
    names = [dns.name.from_text(t) for t in
             ("trust.", "www.trust.", "WWW.TRUST.", "x.www.trust.", "hypermesh.", ".",
              "trust.hypermesh.", "untrust.")]
    for name in names:
        for origin in names:
            assert within(folded(name), folded(origin)) == name.is_subdomain(origin)
