"""The allowed-hosts proxy: the only way out of a sandbox whose network is a list of hosts.

Runs in the KERNEL's event loop, one per subprocess sandbox, on a Unix socket
that is bound into the sandbox (confinement.py) and nowhere else. The sandbox
keeps its private network namespace, so nothing leaves except through here;
inside, a relay on the sandbox's loopback (inside/worker/proxy_relay.py) and
the ordinary proxy variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, lower case
too) point every HTTP client at it. Everything that arrives here is written
by the sandbox, so it is hostile: heads are bounded in size and time, the
connections at once are bounded, and each decision is made here, from the
operator's rules (protocol/allowed_hosts.py), never from what the request
claims about itself.

- `CONNECT host:port` (HTTPS, or any TCP through a CONNECT-capable client):
  the name must be allowed; the proxy resolves it itself (the sandbox has
  no resolver) and connects only to an address the rules permit (a name
  resolving to a private, loopback or link-local address is refused unless
  that address is listed). No TLS interception: but when the first bytes
  are a TLS ClientHello, its server name (SNI) must be the CONNECT's host.
- `GET http://host/...` (plain HTTP, absolute form): the same checks on the
  URL's host, whose Host header must agree. One request per connection:
  the request goes upstream with `Connection: close`, its body counted by
  Content-Length (a chunked upload is refused: 411), and nothing more the
  client sends on that connection is forwarded. A redirect is therefore
  always a new request, checked again.
- SOCKS5 (a first byte of 5; `socks5h://127.0.0.1:3128` inside): CONNECT
  only, no authentication, the same checks as an HTTP CONNECT, for TCP
  that is not HTTP. A refusal is a SOCKS5 reply code; the reason is audited.

Each decision is audited (`on_decision`: the kernel stores it beside the
checkpoints, `%capsule network` shows it) with the cell, host:port, method,
the verdict and its reason, and the bytes each way. A refused request gets
`403 <host:port> is not in the allowed hosts (<where the list came from>)`,
which clients show in their error (`Tunnel connection failed: 403 ...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule_kernel.protocol import allowed_hosts
from capsule_kernel.protocol.allowed_hosts import Rule

# A request head larger than this, or slower than HEAD_SECONDS, is refused.
MAX_HEAD_BYTES = 16 * 1024
HEAD_SECONDS = 10.0
# Connections one sandbox may hold open at once; past it a new one is refused at once.
MAX_CONNECTIONS = 32
# A connection (tunnel or request) lasts at most this long.
CONNECTION_SECONDS = 600.0
# Bytes one cell may move through the proxy, both ways together.
MAX_BYTES_PER_CELL = 4 * 1024**3
# A tunnel's client speaks first (TLS): its first bytes are checked before the proxy connects.
FIRST_BYTES_SECONDS = 1.0
# Resolving a name and connecting to it take at most this long.
CONNECT_SECONDS = 15.0
_BLOCK = 64 * 1024
_MAX_RECORD = 16 * 1024 + 256  # a TLS record's largest body (RFC 8446 5.1, with its allowance)
# The requests that open a tunnel, and what the client is told once it is open (before the proxy
# connects upstream: a TLS client speaks first, and its server name is checked on the way).
TUNNELS = {
    "CONNECT": b"HTTP/1.1 200 Connection established\r\n\r\n",
    "SOCKS5": b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # succeeded, bound to 0.0.0.0:0 (not told)
}
# A refusal's HTTP status, as a SOCKS5 reply code (RFC 1928 section 6).
_SOCKS_REPLIES = {403: 0x02, 502: 0x04, 405: 0x07, 400: 0x01, 503: 0x01, 509: 0x01, 431: 0x01}
# Request headers that belong to this hop (the proxy), never sent upstream.
_HOP_HEADERS = {"connection", "proxy-connection", "proxy-authorization", "keep-alive", "te", "upgrade"}


@dataclass
class Decision:
    """One request through the proxy, as audited."""

    cell: int | None
    method: str
    host: str
    port: int
    allowed: bool
    reason: str
    address: str = ""
    sent: int = 0
    received: int = 0
    at: float = field(default_factory=time.time)


class Refused(Exception):
    """A request the proxy will not carry: its status and the reason, as the client will read it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.opened = False  # the tunnel was open already: what the client reads now is not a reply


class HostProxy:
    """One sandbox's proxy: a Unix socket server applying the allowed hosts."""

    def __init__(
        self,
        rules: tuple[Rule, ...],
        source: str,
        on_decision: Callable[[Decision], None],
        current_cell: Callable[[], int | None],
        resolve: Callable[..., Any] | None = None,
    ) -> None:
        self.rules = rules
        self.source = source  # where the list came from, for the refusal's wording
        self.on_decision = on_decision
        self.current_cell = current_cell
        self._resolve = resolve
        self._server: asyncio.AbstractServer | None = None
        self._active: set[asyncio.Task] = set()
        self._bytes_by_cell: dict[int | None, int] = {}
        self.path: Path | None = None

    async def start(self, path: Path, owner: int | None = None) -> None:
        """Listen on `path` (in a directory of the kernel's own; the sandbox sees it only where it is bound).

        Connecting to a Unix socket needs write access to it: the socket is
        the sandbox's uid's alone (`owner`, given by a root kernel whose
        sandbox runs as another uid), so no other host user can send
        requests that the audit would put on this notebook.
        """
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(path), limit=MAX_HEAD_BYTES)
        if owner is not None and owner != os.getuid():
            os.chown(path, owner, -1)
        os.chmod(path, 0o600)
        self.path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._active):
            task.cancel()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

    @property
    def connections(self) -> int:
        return len(self._active)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._active) >= MAX_CONNECTIONS:
            await _answer(writer, 503, f"more than {MAX_CONNECTIONS} connections at once through the proxy")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            await asyncio.wait_for(self._serve(reader, writer), CONNECTION_SECONDS)
        except (TimeoutError, asyncio.CancelledError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._active.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cell = self.current_cell()
        decision = Decision(cell, "?", "?", 0, False, "")
        answer = _answer
        try:
            opening = await asyncio.wait_for(reader.readexactly(1), HEAD_SECONDS)
            if opening == b"\x05":  # SOCKS5 (RFC 1928): non-HTTP TCP, by the same rules
                answer = _socks_answer
                method, host, port = await asyncio.wait_for(_socks_request(reader, writer), HEAD_SECONDS)
                head = forward = b""
            else:
                head = opening + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
                method, host, port, forward = _parse_head(head)
        except (asyncio.LimitOverrunError, ValueError):
            await _answer(writer, 431, f"a request head longer than {MAX_HEAD_BYTES} bytes")
            return
        except (TimeoutError, asyncio.IncompleteReadError):
            return
        except Refused as refused:
            decision.reason = refused.reason
            self.on_decision(decision)
            await answer(writer, refused.status, refused.reason)
            return
        tunnel = method in TUNNELS
        try:
            decision.method, decision.host, decision.port = method, host, port
            address = await self._decide(host, port)
            decision.address = address[0]
            first = None
            if tunnel:
                first = await self._first_bytes(reader, writer, host, TUNNELS[method])
                if first == b"":
                    decision.reason = "the client closed the tunnel before it said anything"
                    self.on_decision(decision)
                    return
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(address[0], address[1]), CONNECT_SECONDS
            )
        except Refused as refused:
            decision.reason = refused.reason
            self.on_decision(decision)
            if not (tunnel and answer is _socks_answer and refused.opened):
                await answer(writer, refused.status, refused.reason)
            return
        except (OSError, TimeoutError) as err:
            decision.reason = f"{decision.host}:{decision.port} could not be reached ({type(err).__name__})"
            self.on_decision(decision)
            await answer(writer, 502, decision.reason)
            return
        decision.allowed, decision.reason = True, "allowed"
        try:
            if tunnel:
                if first:
                    self._count(decision, "sent", len(first))
                    upstream_writer.write(first)
                # Both ways at once; bytes the client held back past FIRST_BYTES_SECONDS are looked at
                # as they come (a TLS ClientHello must still name the CONNECT's host).
                await asyncio.gather(
                    self._pump(reader, upstream_writer, decision, "sent", check_first=first is None),
                    self._pump(upstream_reader, writer, decision, "received"),
                )
            else:
                body = _content_length(head)
                upstream_writer.write(forward)
                decision.sent += len(forward)
                if body:
                    await self._copy(reader, upstream_writer, decision, body)
                await self._pump(upstream_reader, writer, decision, "received")
        except Refused as refused:
            decision.allowed, decision.reason = False, refused.reason
            if not tunnel:  # (inside a tunnel the client reads TLS, not a status line)
                await _answer(writer, refused.status, refused.reason)
        finally:
            upstream_writer.close()
            writer.close()
            self.on_decision(decision)

    async def _first_bytes(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, established: bytes
    ) -> bytes | None:
        """Open the tunnel and read what the client sends first (None: nothing yet, a server that speaks
        first); a TLS ClientHello naming another host than the CONNECT's is refused before any connection."""
        writer.write(established)
        await writer.drain()
        try:
            first = await asyncio.wait_for(reader.read(_BLOCK), FIRST_BYTES_SECONDS)
        except TimeoutError:
            return None
        first = await _whole_hello(reader, first)
        named = _tls_server_name(first)
        if named is not None and named != host:
            refused = Refused(403, f"the TLS server name {named!r} is not the CONNECT's host {host!r}")
            refused.opened = True
            raise refused
        return first

    async def _decide(self, host: str, port: int) -> tuple[str, int]:
        """The address to connect to, or Refused with the rule's reason."""
        if allowed_hosts.permits(self.rules, host, port) is None:
            raise Refused(403, f"{host}:{port} is not in the allowed hosts ({self.source})")
        literal = allowed_hosts.literal_address(host)
        if literal is not None:
            return str(literal), port
        resolve = self._resolve or asyncio.get_running_loop().getaddrinfo
        try:
            found = await asyncio.wait_for(resolve(host, port, type=socket.SOCK_STREAM), CONNECT_SECONDS)
        except (OSError, TimeoutError):
            raise Refused(502, f"{host} could not be resolved") from None
        refused = []
        for _, _, _, _, sockaddr in found:
            address = allowed_hosts.literal_address(sockaddr[0])
            if address is not None and allowed_hosts.address_permitted(self.rules, address, port):
                return str(address), port
            refused.append(sockaddr[0])
        raise Refused(
            403,
            f"{host}:{port} resolves to {', '.join(sorted(set(refused)))}, a private or local address "
            f"that is not in the allowed hosts ({self.source})",
        )

    async def _copy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decision: Decision, n: int
    ) -> None:
        while n > 0:
            block = await reader.read(min(n, _BLOCK))
            if not block:
                return
            n -= len(block)
            self._count(decision, "sent", len(block))
            writer.write(block)
            await writer.drain()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decision: Decision,
        way: str,
        check_first: bool = False,
    ) -> None:
        try:
            while block := await reader.read(_BLOCK):
                if check_first:
                    block = await _whole_hello(reader, block)
                    named, check_first = _tls_server_name(block), False
                    if named is not None and named != decision.host:
                        decision.allowed = False
                        decision.reason = f"the TLS server name {named!r} is not the CONNECT's host {decision.host!r}"
                        raise Refused(403, decision.reason)
                self._count(decision, way, len(block))
                writer.write(block)
                await writer.drain()  # a slow reader slows only its own connection
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    def _count(self, decision: Decision, way: str, n: int) -> None:
        setattr(decision, way, getattr(decision, way) + n)
        # Counted against the cell running now, whichever cell opened the connection (a thread a
        # cell left behind moves bytes during the next): only the running cell's count is kept.
        cell = self.current_cell()
        total = self._bytes_by_cell.get(cell, 0) + n
        self._bytes_by_cell = {cell: total}
        if total > MAX_BYTES_PER_CELL:
            raise Refused(509, f"the cell moved more than {MAX_BYTES_PER_CELL} bytes through the proxy")


def _parse_head(head: bytes) -> tuple[str, str, int, bytes]:
    """(method, host, port, the head to send upstream) of a proxy request; Refused if it is not one."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise Refused(400, "an unreadable request") from None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Refused(400, "not an HTTP/1.x proxy request")
    method, target, version = parts
    headers = [line.split(":", 1) for line in header_lines if line]
    if any(len(pair) != 2 for pair in headers):
        raise Refused(400, "a malformed header line")
    if method == "CONNECT":
        host, port = _host_port(target, None)
        return method, host, port, b""
    if not target.lower().startswith("http://"):
        raise Refused(400, "only http:// URLs (absolute form) and CONNECT go through the proxy")
    rest = target[len("http://") :]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise Refused(400, "credentials in a proxied URL")
    host, port = _host_port(authority, 80)
    for name, value in headers:
        if name.strip().lower() == "host" and _host_port(value.strip(), 80) != (host, port):
            raise Refused(403, f"the Host header {value.strip()!r} is not the URL's host {host}:{port}")
    if any(name.strip().lower() == "transfer-encoding" for name, _ in headers):
        raise Refused(411, "a chunked request body: send a Content-Length")
    kept = [f"{name}:{value}" for name, value in headers if name.strip().lower() not in _HOP_HEADERS]
    forward = "\r\n".join([f"{method} {slash}{path} {version}", *kept, "Connection: close", "", ""])
    return method, host, port, forward.encode("latin-1")


def _host_port(authority: str, default: int | None) -> tuple[str, int]:
    """`host:port` -> (normal host, port); Refused if it names no host."""
    authority = authority.strip()
    if authority.startswith("["):
        close = authority.find("]")
        host, rest = authority[1:close], authority[close + 1 :] if close > 0 else ""
        port_text = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    else:
        host, port_text = authority, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise Refused(400, f"{authority!r}: not a port")
        port = int(port_text)
    elif default is None:
        raise Refused(400, f"CONNECT {authority!r} names no port")
    else:
        port = default
    normal = allowed_hosts.normal_host(host)
    if normal is None:
        raise Refused(400, f"{host!r} is not a host")
    return normal, port


def _content_length(head: bytes) -> int:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise Refused(400, "a malformed Content-Length")
            return int(value.strip())
    return 0


async def _whole_hello(reader: asyncio.StreamReader, data: bytes) -> bytes:
    """`data`, and when it starts a TLS handshake record, the rest of that record (its ClientHello).

    A client may send its hello in pieces (a byte at a time, to slip past a
    check of the first read): the server name is read from the whole record.
    A record is at most 16 KiB and comes within FIRST_BYTES_SECONDS, else the
    bytes are what they are and the parse finds no name ("?": refused).
    """
    if not data or data[0] != 0x16:
        return data
    deadline = asyncio.get_running_loop().time() + FIRST_BYTES_SECONDS
    while len(data) < 5 or len(data) < 5 + min(int.from_bytes(data[3:5], "big"), _MAX_RECORD):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        try:
            more = await asyncio.wait_for(reader.read(_BLOCK), left)
        except TimeoutError:
            break
        if not more:
            break
        data += more
    return data


def _tls_server_name(data: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello at the start of `data`; None if there is none to read."""
    try:
        if not data or data[0] != 0x16:
            return None  # not TLS: a protocol of its own, to an address the rules allowed
        if len(data) < 43 or data[5] != 0x01:
            return "?"  # a handshake that is not (all) a ClientHello names no allowed host
        at = 9 + 2 + 32  # record header (5), handshake header (4), version (2), random (32)
        at += 1 + data[at]  # session id
        at += 2 + int.from_bytes(data[at : at + 2], "big")  # cipher suites
        at += 1 + data[at]  # compression methods
        end = at + 2 + int.from_bytes(data[at : at + 2], "big")
        at += 2
        while at + 4 <= min(end, len(data)):
            kind, size = int.from_bytes(data[at : at + 2], "big"), int.from_bytes(data[at + 2 : at + 4], "big")
            if kind == 0:  # server_name: list length (2), type (1), name length (2), name
                length = int.from_bytes(data[at + 7 : at + 9], "big")
                return data[at + 9 : at + 9 + length].decode("ascii").lower().rstrip(".")
            at += 4 + size
    except (IndexError, UnicodeDecodeError):
        return "?"  # a ClientHello that does not parse names no allowed host
    return None


async def _socks_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, str, int]:
    """A SOCKS5 greeting (after its version byte) and CONNECT request: ("SOCKS5", host, port).

    Only "no authentication" and CONNECT: the sandbox has no credentials to
    give, and nothing listens for it (no BIND, no UDP ASSOCIATE). A name
    (socks5h://) is resolved here, as every name is; the sandbox has no resolver.
    """
    methods = await reader.readexactly((await reader.readexactly(1))[0])
    if 0x00 not in methods:
        writer.write(b"\x05\xff")
        raise Refused(400, "a SOCKS5 client that offers no 'no authentication' method")
    writer.write(b"\x05\x00")
    await writer.drain()
    version, command, _, kind = await reader.readexactly(4)
    if version != 5:
        raise Refused(400, "not a SOCKS5 request")
    if kind == 0x01:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif kind == 0x04:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif kind == 0x03:
        raw = await reader.readexactly((await reader.readexactly(1))[0])
        host = raw.decode("ascii", errors="replace")
    else:
        raise Refused(400, f"a SOCKS5 address of unknown type {kind}")
    port = int.from_bytes(await reader.readexactly(2), "big")
    if command != 0x01:
        raise Refused(405, "only SOCKS5 CONNECT goes through the proxy (no BIND, no UDP)")
    normal = allowed_hosts.normal_host(host)
    if normal is None or not 0 < port < 65536:
        raise Refused(400, f"{host!r}:{port} is not a host and port")
    return "SOCKS5", normal, port


async def _socks_answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:  # noqa: ARG001
    """A SOCKS5 refusal: a reply code only (the reason is in the audit and %capsule network)."""
    with contextlib.suppress(OSError, RuntimeError):
        writer.write(bytes([0x05, _SOCKS_REPLIES.get(status, 0x01), 0x00, 0x01, 0, 0, 0, 0, 0, 0]))
        await writer.drain()


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """A one-line refusal the client shows (its reason phrase), and the same text as the body."""
    phrase = reason.replace("\r", " ").replace("\n", " ")
    body = (phrase + "\n").encode()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write(
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
