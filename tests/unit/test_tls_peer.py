"""``TlsPeer`` from what ``getpeercert()`` returns, and ``PeerPolicy(tls_names=...)`` on it.

No socket: the certificate dictionary below has the shape the ``ssl`` module
gives for a verified peer (nested subject tuples, subjectAltName pairs).
``tests/remote/test_tls.py`` does the same over real mutual TLS.
"""

from __future__ import annotations

import dataclasses

import pytest

import afunix
from afunix import PeerPolicy, PolicyError, TlsPeer

CERT = {
    "subject": ((("organizationName", "Example"),), (("commonName", "billing.internal"),)),
    "issuer": ((("commonName", "Example CA"),),),
    "subjectAltName": (
        ("DNS", "billing.internal"),
        ("DNS", "billing.example.com"),
        ("URI", "spiffe://example.com/billing"),
        ("IP Address", "10.0.0.7"),
    ),
    "serialNumber": "1A2B",
    "notAfter": "Dec  5 10:00:00 2036 GMT",
}


def test_from_certificate_reads_names_subject_and_issuer() -> None:
    peer = TlsPeer.from_certificate(CERT, "TLSv1.3")
    assert peer.common_name == "billing.internal"
    assert peer.dns_names == ("billing.internal", "billing.example.com")
    assert peer.uri_names == ("spiffe://example.com/billing",)
    assert peer.ip_addresses == ("10.0.0.7",)
    assert peer.subject == (("organizationName", "Example"), ("commonName", "billing.internal"))
    assert peer.issuer == (("commonName", "Example CA"),)
    assert (peer.serial_number, peer.version) == ("1A2B", "TLSv1.3")
    # the CN, then DNS and URI names, each once
    assert peer.names == (
        "billing.internal",
        "billing.example.com",
        "spiffe://example.com/billing",
    )
    assert "CN=billing.internal" in peer.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        peer.common_name = "someone else"  # type: ignore[misc]
    assert afunix.TlsPeer is TlsPeer


def test_a_certificate_without_cn_or_names() -> None:
    peer = TlsPeer.from_certificate({"subject": ()})
    assert peer.common_name is None and peer.names == ()
    assert peer.describe() == "certificate no CN"
    assert not PeerPolicy(tls_names=["x"]).allows(peer)


@pytest.mark.parametrize(
    "name", ["billing.internal", "billing.example.com", "spiffe://example.com/billing"]
)
def test_a_policy_allows_any_name_of_the_certificate(name: str) -> None:
    decision = PeerPolicy(tls_names=[name]).check(TlsPeer.from_certificate(CERT))
    assert decision.allowed and name in decision.reason


def test_a_policy_denies_other_names_and_ip_addresses() -> None:
    peer = TlsPeer.from_certificate(CERT)
    for names in (["payroll.internal"], ["10.0.0.7"], ["BILLING.INTERNAL"]):  # exact matches only
        decision = PeerPolicy(tls_names=names).check(peer)
        assert not decision.allowed
        assert "'billing.internal'" in decision.reason
    # uid rules never allow a TLS peer, tls_names never a Unix one
    assert not PeerPolicy(uids=[0], same_user=True).allows(peer)


def test_tls_names_are_checked_and_described() -> None:
    with pytest.raises(PolicyError, match="not the string"):
        PeerPolicy(tls_names="billing.internal")
    with pytest.raises(PolicyError, match="empty"):
        PeerPolicy(tls_names=[""])
    policy = PeerPolicy(tls_names=["b", "a"])
    assert not policy.empty
    assert policy.describe() == "allow TLS certificates named 'a'; allow TLS certificates named 'b'"
