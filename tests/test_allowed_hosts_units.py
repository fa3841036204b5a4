"""The allowed-hosts rules (protocol/allowed_hosts.py) and the network limit's parser (protocol/limits.py)."""

from __future__ import annotations

import ipaddress

import pytest

from capsule_kernel.protocol import allowed_hosts as ah
from capsule_kernel.protocol.limits import LimitError, parse_network

RULES = ah.parse_rules(["pypi.org", "*.example.com", "api.other.org:8443", "10.1.2.0/24", "[fd00::1]:443"])


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("pypi.org", 443, True),
        ("pypi.org", 80, True),
        ("pypi.org", 22, False),
        ("files.pypi.org", 443, False),  # a name is that name only
        ("a.example.com", 443, True),
        ("a.b.example.com", 80, True),
        ("example.com", 443, False),  # *.example.com is below it, not it
        ("evilexample.com", 443, False),
        ("api.other.org", 8443, True),
        ("api.other.org", 443, False),  # its port only
        ("10.1.2.7", 443, True),
        ("10.1.3.7", 443, False),
        ("fd00::1", 443, True),
        ("fd00::2", 443, False),
        ("127.0.0.1", 80, False),  # IP literals only when listed
    ],
)
def test_a_request_is_allowed_by_its_name_or_literal_and_port(host, port, allowed):
    assert (ah.permits(RULES, host, port) is not None) is allowed


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.0.0.5", "192.168.1.1", "172.16.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1",
     "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1"],
)  # fmt: skip
def test_a_name_never_reaches_a_local_private_or_metadata_address_that_is_not_listed(address):
    assert not ah.address_permitted(RULES, ipaddress.ip_address(address), 443)


def test_a_listed_private_address_and_a_public_one_are_reachable():
    assert ah.address_permitted(RULES, ipaddress.ip_address("10.1.2.9"), 443)
    assert not ah.address_permitted(RULES, ipaddress.ip_address("10.1.2.9"), 8080)  # not its port
    assert ah.address_permitted(RULES, ipaddress.ip_address("151.101.0.223"), 443)


@pytest.mark.parametrize("bad", ["*", "*.com", "http://pypi.org", "pypi.org:0", "pypi.org:99999", "a..b", "10.0.0.0/33",
                                 "", "[::1", "-bad.com", 7])  # fmt: skip
def test_what_is_not_a_rule_is_refused_with_the_rule(bad):
    with pytest.raises(ah.RuleError):
        ah.parse_rule(bad)


def test_the_network_limit_reads_on_off_a_list_or_a_comma_list():
    assert parse_network("on") is True and parse_network("off") is False and parse_network(False) is False
    assert parse_network("pypi.org, *.example.com") == ("pypi.org", "*.example.com")
    assert parse_network(["10.0.0.0/8"]) == ("10.0.0.0/8",)
    for bad in ([], "", ["*"], 3):
        with pytest.raises(LimitError):
            parse_network(bad)


@pytest.mark.parametrize(
    ("narrow", "inside"),
    [
        (["pypi.org"], True),
        (["pypi.org:443"], True),
        (["x.example.com", "*.y.example.com"], True),
        (["10.1.2.128/25"], True),
        (["example.com"], False),
        (["*.other.org"], False),  # a wildcard is covered by a wildcard only
        (["api.other.org"], False),  # 80 and 443, wider than its 8443
        (["10.1.0.0/16"], False),
        (["files.pythonhosted.org"], False),
    ],
)
def test_a_notebook_list_only_narrows_the_operators(narrow, inside):
    assert (ah.covers(RULES, ah.parse_rules(narrow)) is None) is inside
