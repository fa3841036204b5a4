"""The relay INSIDE the subprocess sandbox: its loopback's proxy port, carried to the kernel's proxy socket.

A sandbox whose network is a list of allowed hosts has no network of its
own (a private namespace with only loopback). HTTP clients find a proxy in
the usual variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, lower case too,
set at launch): http://127.0.0.1:<port>, the port and the socket's place
given in the worker's start-up config ("proxy"). This relay accepts there and
copies each connection's bytes, unchanged, to and from the Unix socket the
kernel bound into the sandbox (kernel/network/proxy.py), which decides
everything. Nothing here is trusted or needs to be: a cell may stop the
relay, or speak to the socket itself, and reaches no more than the rules
allow.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

_BLOCK = 64 * 1024


def start(socket_path: str, port: int) -> threading.Thread | None:
    """Listen on 127.0.0.1:port and relay from a daemon thread; None if the port cannot be had."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
    except OSError:
        listener.close()
        return None
    thread = threading.Thread(target=_accept, args=(listener, socket_path), name="capsule-proxy-relay", daemon=True)
    thread.start()
    return thread


def _accept(listener: socket.socket, socket_path: str) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_relay, args=(client, socket_path), name="capsule-proxy-conn", daemon=True).start()


def _relay(client: socket.socket, socket_path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(socket_path)
    except OSError:
        client.close()
        upstream.close()
        return
    with selectors.DefaultSelector() as selector, client, upstream:
        peers = {client: upstream, upstream: client}
        for end in peers:
            selector.register(end, selectors.EVENT_READ)
        while peers:
            for key, _ in selector.select():
                source = key.fileobj
                target = peers.get(source)  # type: ignore[call-overload]
                if target is None:
                    continue
                try:
                    block = source.recv(_BLOCK)  # type: ignore[union-attr]
                except OSError:
                    block = b""
                if block:
                    try:
                        target.sendall(block)
                        continue
                    except OSError:
                        pass
                # One way ended: pass the end on; the connection ends when both have.
                selector.unregister(source)
                del peers[source]
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_WR)
                if target not in peers:
                    return
