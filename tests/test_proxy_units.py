"""The allowed-hosts proxy (kernel/network/proxy.py) on its own: a real Unix socket, a real upstream on 127.0.0.1.

Each refusal is asserted on the upstream: it accepted no connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from capsule_kernel.kernel.network.proxy import HostProxy
from capsule_kernel.protocol import allowed_hosts


class Upstream:
    """An echo server on 127.0.0.1 that counts the connections it accepted."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()


async def proxied(tmp_path, rules: list[str]):
    upstream = Upstream()
    await upstream.start()
    decisions = []
    proxy = HostProxy(
        allowed_hosts.parse_rules([rule.format(port=upstream.port) for rule in rules]),
        "test rules",
        decisions.append,
        lambda: 7,
    )
    await proxy.start(tmp_path / "proxy.sock")
    return upstream, proxy, decisions


async def socks(
    path, address: bytes, port: int, command: int = 1
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A SOCKS5 greeting and request by hand: (the reply code, the open stream)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(bytes([5, command, 0]) + address + struct.pack(">H", port))
    reply = await reader.readexactly(10)
    assert reply[0] == 5
    return reply[1], reader, writer


def ipv4(text: str) -> bytes:
    return b"\x01" + socket.inet_aton(text)


def name(text: str) -> bytes:
    return b"\x03" + bytes([len(text)]) + text.encode()


def test_socks5_reaches_an_allowed_address_and_an_allowed_name(tmp_path):
    async def scenario():
        upstream, proxy, decisions = await proxied(tmp_path, ["127.0.0.1:{port}", "localhost:{port}"])
        try:
            for address in (ipv4("127.0.0.1"), name("localhost")):
                code, reader, writer = await socks(proxy.path, address, upstream.port)
                assert code == 0
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
            await asyncio.wait_for(_until(lambda: len(decisions) == 2), 10)
            assert [(d.method, d.host, d.allowed, d.cell) for d in decisions] == [
                ("SOCKS5", "127.0.0.1", True, 7),
                ("SOCKS5", "localhost", True, 7),
            ]
            assert decisions[0].sent == 4 and decisions[0].received == 4
            assert upstream.connections == 2
        finally:
            await proxy.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("address", "command", "code", "reason"),
    [
        (ipv4("127.0.0.2"), 1, 0x02, "is not in the allowed hosts (test rules)"),
        (name("localhost"), 1, 0x02, "a private or local address that is not in the allowed hosts"),
        (b"\x04" + socket.inet_pton(socket.AF_INET6, "::1"), 1, 0x02, "is not in the allowed hosts"),
        (ipv4("127.0.0.1"), 2, 0x07, "only SOCKS5 CONNECT"),  # BIND: nothing listens for a sandbox
        (ipv4("127.0.0.1"), 3, 0x07, "only SOCKS5 CONNECT"),  # UDP ASSOCIATE
    ],
    ids=["unlisted-ip", "name-to-unlisted-loopback", "ipv6", "bind", "udp"],
)
def test_socks5_refuses_what_the_rules_do_not_allow_and_never_connects(tmp_path, address, command, code, reason):
    async def scenario():
        # localhost is allowed by name, but 127.0.0.1 only on another port: the name resolves to nothing allowed.
        upstream, proxy, decisions = await proxied(tmp_path, ["127.0.0.1:{port}", "localhost:{port}"])
        try:
            port = upstream.port
            if reason.startswith("a private"):
                proxy.rules = allowed_hosts.parse_rules([f"localhost:{port}"])
            got, _, writer = await socks(proxy.path, address, port, command)
            writer.close()
            assert got == code
            await asyncio.wait_for(_until(lambda: decisions), 10)
            assert not decisions[0].allowed and reason in decisions[0].reason, decisions[0]
            assert upstream.connections == 0
        finally:
            await proxy.close()

    asyncio.run(scenario())


def test_socks5_checks_the_tls_server_name_as_connect_does(tmp_path):
    import ssl

    async def scenario():
        upstream, proxy, decisions = await proxied(tmp_path, ["localhost:{port}", "127.0.0.1:{port}"])
        try:
            code, reader, writer = await socks(proxy.path, name("localhost"), upstream.port)
            assert code == 0  # open: the client speaks first
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="refused.example")
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            writer.write(outgoing.read())
            assert await reader.read(100) == b""  # closed, nothing relayed
            await asyncio.wait_for(_until(lambda: decisions), 10)
            assert "'refused.example' is not the CONNECT's host 'localhost'" in decisions[0].reason
            assert upstream.connections == 0
        finally:
            await proxy.close()

    asyncio.run(scenario())


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
