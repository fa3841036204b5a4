"""Real servers on the host's loopback, for the allowed-hosts tests: what each one saw.

An attack through the proxy is held when its target saw nothing: every
listener here counts the connections it accepted (before any byte is read)
and the requests it answered, so a test asserts on the listener, not on a
status line the sandbox could have been told.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness import wait_until

PACKAGE = "capsuledemo"
WHEEL = f"{PACKAGE}-0.1-py3-none-any.whl"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: int, routes: dict[str, bytes]) -> None:
        self.address_family = family
        self.routes = routes
        self.connections = 0
        self.paths: list[str] = []
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # http.server's name
        self.server.paths.append(self.path)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.routes.get(self.path.split("?")[0], b"hello from the host\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path.startswith("/simple") else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Listener:
    """An HTTP server on one loopback address (and a package index for `pip download`)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.server = _Server((host, 0), family, _package_index())
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def connections(self) -> int:
        return self.server.connections

    @property
    def paths(self) -> list[str]:
        return list(self.server.paths)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class UdpListener:
    """A UDP socket on the host's loopback; `seen()` is every datagram up to a marker the test sends itself."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def seen(self) -> list[bytes]:
        """What arrived before the marker: datagrams sent before it (a finished cell's) queue ahead of it."""
        marker = b"capsule-test-marker"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.sendto(marker, ("127.0.0.1", self.port))
        found: list[bytes] = []
        self.sock.settimeout(10)
        while (data := self.sock.recv(65536)) != marker:
            found.append(data)
        return found

    def close(self) -> None:
        self.sock.close()


class UnixListener:
    """A Unix socket server (by path, or abstract when `path` starts with NUL) that counts accepted connections."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def accepted(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


def wait_for_path(listener: Listener, path: str) -> None:
    wait_until(lambda: path in listener.paths, timeout=10, what=f"the listener to see {path}")


def _package_index() -> dict[str, bytes]:
    """A PEP 503 index of one pure-Python wheel, made here (no network)."""
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{PACKAGE}/__init__.py", "VALUE = 42\n")
        info = f"{PACKAGE}-0.1.dist-info"
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1\n")
        wheel_info = "Wheel-Version: 1.0\nGenerator: capsule-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{info}/WHEEL", wheel_info)
        archive.writestr(f"{info}/RECORD", "")
    return {
        "/simple/": f'<a href="/simple/{PACKAGE}/">{PACKAGE}</a>'.encode(),
        f"/simple/{PACKAGE}/": f'<a href="/files/{WHEEL}">{WHEEL}</a>'.encode(),
        f"/files/{WHEEL}": wheel.getvalue(),
    }


@contextlib.contextmanager
def closing_all(*things: Any):
    try:
        yield things
    finally:
        for thing in things:
            with contextlib.suppress(Exception):
                thing.close()


__all__ = ["PACKAGE", "WHEEL", "Listener", "UdpListener", "UnixListener", "closing_all", "wait_for_path"]
