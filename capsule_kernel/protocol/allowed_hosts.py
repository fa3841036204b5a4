"""The allowed-hosts vocabulary: `network = ["pypi.org", "*.example.com", "api.example.com:8443", "10.1.2.0/24"]`.

Pure functions, no I/O: the operator's setting is parsed here (protocol/limits
validates it with `parse_rules`), the kernel's proxy asks `permits` about each
request and `address_permitted` about each address a name resolves to, and
the policy asks `covers` whether a notebook's list only narrows the
operator's.

The rules, as sandbox products and browsers spell them:

- `example.com` is that name only; `*.example.com` is any name below it (at
  any depth), not `example.com` itself. A bare `*` is not a rule: that is
  `network = "on"`.
- A port is `:443`; without one a rule allows 80 and 443.
- An IP literal (`10.1.2.3`, `[fd00::1]:8443`) or a CIDR (`10.1.2.0/24`) allows
  those addresses, reached by literal or by a name that resolves to them. A
  name that resolves to a loopback, private, link-local (the cloud metadata
  address), shared, reserved or multicast address is refused unless that
  address is itself listed: the rule for `example.com` never reaches
  127.0.0.1 through a name pointed there (DNS rebinding, SSRF).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

DEFAULT_PORTS = frozenset({80, 443})
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleError(ValueError):
    """A host rule that is not one (said with the rule)."""


class Rule(NamedTuple):
    """One allowed-hosts entry: a name, a wildcard (`suffix` below which any name matches) or a network."""

    kind: str  # "name" | "wildcard" | "net"
    name: str  # the name, or the wildcard's suffix ("example.com" for "*.example.com"), or ""
    net: _IPNetwork | None
    ports: frozenset[int]
    text: str  # as the operator wrote it

    def matches_name(self, host: str) -> bool:
        if self.kind == "name":
            return host == self.name
        return self.kind == "wildcard" and host.endswith("." + self.name)


def parse_rules(entries: Iterable[object]) -> tuple[Rule, ...]:
    """Every entry parsed; RuleError names the first that is not a rule."""
    rules = tuple(parse_rule(entry) for entry in entries)
    if not rules:
        raise RuleError('an empty list allows nothing: write network = "off"')
    return rules


def parse_rule(entry: object) -> Rule:
    if not isinstance(entry, str) or not entry.strip():
        raise RuleError(f"{entry!r} is not a host (a name, *.name, an IP address or a CIDR, with :port or not)")
    text = entry.strip()
    host, ports = _split_port(text.lower())
    net = _network(host)
    if net is not None:
        return Rule("net", "", net, ports, text)
    if host.startswith("*."):
        suffix = _name(host[2:], text)
        if "." not in suffix:
            raise RuleError(f"{text!r}: a wildcard needs a domain of two labels at least (*.example.com)")
        return Rule("wildcard", suffix, None, ports, text)
    return Rule("name", _name(host, text), None, ports, text)


def _split_port(text: str) -> tuple[str, frozenset[int]]:
    if text.startswith("["):  # [v6]:port or [v6]
        close = text.find("]")
        if close < 0:
            raise RuleError(f"{text!r}: an unclosed [")
        host, rest = text[1:close], text[close + 1 :]
        if not rest:
            return host, DEFAULT_PORTS
        if not rest.startswith(":"):
            raise RuleError(f"{text!r}: expected :port after ]")
        return host, _port(rest[1:], text)
    if text.count(":") == 1:  # name:port, v4:port, v4/len:port
        host, _, port = text.partition(":")
        return host, _port(port, text)
    return text, DEFAULT_PORTS  # a name, v4, v4/len, or a bare v6 (no port)


def _port(text: str, rule: str) -> frozenset[int]:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RuleError(f"{rule!r}: {text!r} is not a port (1 to 65535)")
    return frozenset({int(text)})


def _network(host: str) -> _IPNetwork | None:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        if "/" in host or ":" in host:
            raise RuleError(f"{host!r} is neither an IP address nor a CIDR") from None
        return None


def _name(host: str, rule: str) -> str:
    host = host.rstrip(".")
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise RuleError(f"{rule!r} is not a host name (letters, digits and hyphens, in dot-separated labels)")
    if all(label.isdigit() for label in labels):
        raise RuleError(f"{rule!r} is not a host name")
    return host


def literal_address(host: str) -> _IPAddress | None:
    """The address a request names as a literal (`10.0.0.1`, `::1`, `[::1]`), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def normal_host(host: str) -> str | None:
    """A request's host as the rules compare it (lower case, no trailing dot), or None if it is no host."""
    literal = literal_address(host)
    if literal is not None:
        return str(literal)
    try:
        return _name(host.lower(), host)
    except RuleError:
        return None


def permits(rules: Iterable[Rule], host: str, port: int) -> Rule | None:
    """The rule that allows `host:port` by its name or literal (before any name is resolved), or None."""
    literal = literal_address(host)
    for rule in rules:
        if port not in rule.ports:
            continue
        if literal is not None:
            if rule.kind == "net" and _contains(rule.net, literal):
                return rule
        elif rule.matches_name(host):
            return rule
    return None


def address_permitted(rules: Iterable[Rule], address: _IPAddress, port: int) -> bool:
    """May a connection go to this resolved address? Public ones yes; others only when listed."""
    if any(rule.kind == "net" and port in rule.ports and _contains(rule.net, address) for rule in rules):
        return True
    return _public(address)


def _public(address: _IPAddress) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_global and not address.is_multicast


def _contains(net: _IPNetwork | None, address: _IPAddress) -> bool:
    return net is not None and net.version == address.version and address in net


def covers(wide: Iterable[Rule], narrow: Iterable[Rule]) -> Rule | None:
    """The first rule of `narrow` that no rule of `wide` covers (None: `narrow` only narrows `wide`)."""
    wide = tuple(wide)
    for rule in narrow:
        if not any(_covers(outer, rule) for outer in wide):
            return rule
    return None


def _covers(outer: Rule, inner: Rule) -> bool:
    if not inner.ports <= outer.ports:
        return False
    if inner.kind == "net":
        return (
            outer.kind == "net"
            and outer.net is not None
            and inner.net is not None
            and outer.net.version == inner.net.version
            and inner.net.subnet_of(outer.net)  # type: ignore[arg-type]
        )
    if inner.kind == "name":
        return outer.matches_name(inner.name)
    return outer.kind == "wildcard" and (inner.name == outer.name or inner.name.endswith("." + outer.name))


def describe(rules: Iterable[Rule]) -> str:
    return ", ".join(rule.text for rule in rules)
