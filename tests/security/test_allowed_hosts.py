"""Allowed hosts (issue 29), attacked from inside the subprocess sandbox.

The operator's `network` is a list of hosts; the sandbox keeps its private
network namespace and reaches out only through the kernel's proxy. Every
server here is real, on the host's loopback, and every refusal is asserted
on the server: the refused request never reached it (no connection was
accepted), not only "the sandbox saw a 403".

Loopback is private, so the rules name it explicitly: `localhost:P` (a name,
resolved by the proxy) and `127.0.0.1:P` (the address it resolves to).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from tests.harness import start_kernel, wait_until
from tests.security.helpers import kernel_pid
from tests.security.listeners import PACKAGE, WHEEL, Listener, UdpListener, UnixListener, closing_all, wait_for_path
from tests.security.test_trust_boundary import FORGE

# A CONNECT through the relay by hand, then a real TLS ClientHello for `hostname`: what came back.
TUNNEL = """
import socket, ssl, time
def tunnel(target, hostname, pieces=False):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head and (byte := s.recv(1)):
        head += byte
    status = head.split(b"\\r\\n")[0].decode()
    if not status.endswith("200 Connection established"):
        return status, b""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if pieces:  # the record's first byte alone, then its header, then the rest
        for part in (hello[:1], hello[1:5], hello[5:]):
            s.sendall(part)
            time.sleep(0.2)
    else:
        s.sendall(hello)
    s.settimeout(20)
    try:
        answer = s.recv(200)
    except OSError as err:
        answer = repr(err).encode()
    s.close()
    return status, answer
"""


@pytest.fixture(scope="module")
def servers():
    with closing_all(Listener(), Listener("127.0.0.2"), Listener("::1")) as found:
        yield found


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed-hosts")


@pytest.fixture(scope="module")
def kernel(servers, home):
    allowed, _, _ = servers
    work = home / "work"
    work.mkdir()
    env = {
        "CAPSULE_HOME": str(home / "capsule"),
        "CAPSULE_SESSION": "allowed-hosts-a",
        "CAPSULE_NETWORK": f"localhost:{allowed.port},127.0.0.1:{allowed.port}",
    }
    harness = start_kernel(env=env, cwd=work)
    yield harness
    harness.close()


def network_rows(kernel) -> str:
    result = kernel.execute("%capsule network -n 200")
    assert result.status == "ok", result.texts()
    return result.texts()


def test_urllib_requests_curl_and_pip_reach_an_allowed_host(kernel, servers):
    allowed, _, _ = servers
    got = kernel.execute(f"import urllib.request\nurllib.request.urlopen('{allowed.url}/urllib').read().decode()")
    assert "hello from the host" in got.result_text, got.texts()
    got = kernel.execute(f"import requests\nrequests.get('http://localhost:{allowed.port}/requests').text")
    assert "hello from the host" in got.result_text, got.texts()
    got = kernel.execute(f"!curl -sS http://localhost:{allowed.port}/curl")
    assert "hello from the host" in got.stdout, got.texts()
    got = kernel.execute(
        "import sys\n"
        f"!{{sys.executable}} -m pip download -q --no-deps -d /tmp/dl"
        f" --index-url http://localhost:{allowed.port}/simple/ {PACKAGE}"
        "\nimport os\nprint(os.listdir('/tmp/dl'))"
    )
    assert WHEEL in got.stdout, got.texts()
    for path in ("/urllib", "/requests", "/curl", f"/files/{WHEEL}"):
        assert path in allowed.paths
    rows = network_rows(kernel)
    assert f"localhost:{allowed.port}" in rows and "allowed" in rows


def test_a_refused_host_never_reaches_its_listener_and_the_error_names_it(kernel, servers):
    _, other, _ = servers
    before = other.connections
    got = kernel.execute(f"import urllib.request\nurllib.request.urlopen('{other.url}/refused')")
    assert got.status == "error"
    assert f"127.0.0.2:{other.port} is not in the allowed hosts (environment CAPSULE_NETWORK)" in got.error["evalue"]
    got = kernel.execute(f"import requests\nrequests.get('https://127.0.0.2:{other.port}/refused-tls')")
    assert got.status == "error" and "403" in got.texts(), got.texts()
    got = kernel.execute(f"!curl -sS http://127.0.0.2:{other.port}/refused-curl; echo rc=$?")
    assert "rc=0" not in got.stdout or "not in the allowed hosts" in got.stdout, got.texts()
    assert other.connections == before and other.paths == []
    assert f"refused 127.0.0.2:{other.port} is not in the allowed hosts" in network_rows(kernel)


def test_socks5_clients_follow_the_same_rules(kernel, servers):
    """curl through SOCKS5 (socks5h: the name is resolved by the proxy), to an allowed and a refused host."""
    allowed, other, _ = servers
    before = other.connections
    got = kernel.execute(f"!curl -sS --proxy socks5h://127.0.0.1:3128 http://localhost:{allowed.port}/socks")
    assert "hello from the host" in got.stdout, got.texts()
    assert "/socks" in allowed.paths
    got = kernel.execute(f"!curl -sS --proxy socks5h://127.0.0.1:3128 {other.url}/socks-refused; echo rc=$?")
    assert "rc=0" not in got.stdout, got.texts()
    assert other.connections == before
    rows = network_rows(kernel)
    assert re.search(rf"SOCKS5\s+localhost:{allowed.port}\s+allowed", rows), rows
    assert re.search(rf"SOCKS5\s+127\.0\.0\.2:{other.port}\s+refused", rows), rows


def test_a_port_that_is_not_listed_is_refused(kernel, servers):
    allowed, _, _ = servers
    with closing_all(Listener()) as (unlisted,):
        got = kernel.execute(f"import urllib.request\nurllib.request.urlopen('{unlisted.url}/port')")
        assert got.status == "error" and "is not in the allowed hosts" in got.error["evalue"]
        assert unlisted.connections == 0
    assert allowed.port != unlisted.port


def test_each_redirect_is_checked_again(kernel, servers):
    allowed, other, _ = servers
    before = other.connections
    got = kernel.execute(
        f"import urllib.request\nurllib.request.urlopen('{allowed.url}/redirect?to={other.url}/after-redirect')"
    )
    assert got.status == "error" and f"127.0.0.2:{other.port} is not in the allowed hosts" in got.error["evalue"]
    wait_for_path(allowed, f"/redirect?to={other.url}/after-redirect")  # the first hop was allowed...
    assert other.connections == before  # ...the second never left


def test_a_connect_to_a_refused_ip_literal_or_an_ipv6_literal_is_refused(kernel, servers):
    allowed, other, six = servers
    before = (allowed.connections, other.connections, six.connections)
    got = kernel.execute(
        TUNNEL + f"[tunnel('127.0.0.2:{other.port}', 'x')[0], tunnel('[::1]:{six.port}', 'x')[0],"
        f" tunnel('[::ffff:127.0.0.1]:{allowed.port}', 'x')[0]]"
    )
    answers = got.result_text
    assert answers.count("403") == 3, got.texts()
    assert (allowed.connections, other.connections, six.connections) == before
    got = kernel.execute(f"import urllib.request\nurllib.request.urlopen('{six.url}/six')")
    assert got.status == "error" and "not in the allowed hosts" in got.error["evalue"]
    assert six.connections == before[2] and six.paths == []


@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "in-pieces"])
def test_a_connect_to_an_allowed_name_with_another_tls_server_name_is_refused(kernel, servers, pieces):
    allowed, _, _ = servers
    before = allowed.connections
    got = kernel.execute(TUNNEL + f"tunnel('localhost:{allowed.port}', 'refused.example', pieces={pieces})")
    assert got.status == "ok", got.texts()
    # The tunnel opened (TLS speaks first), then the proxy read the hello and answered in it, not upstream.
    assert "200 Connection established" in got.result_text, got.texts()
    assert "403 the TLS server name 'refused.example'" in got.result_text, got.texts()
    assert allowed.connections == before  # the proxy never connected upstream
    assert "the TLS server name 'refused.example' is not the CONNECT's host 'localhost'" in network_rows(kernel)
    # The same tunnel with the right name reaches the listener (which answers TLS with HTTP's 400).
    got = kernel.execute(TUNNEL + f"tunnel('localhost:{allowed.port}', 'localhost', pieces={pieces})")
    assert "400" in got.result_text, got.texts()
    wait_until(lambda: allowed.connections == before + 1, timeout=10, what="the allowed tunnel to connect")


def test_a_plain_request_whose_host_header_disagrees_is_refused(kernel, servers):
    allowed, other, _ = servers
    before = other.connections
    got = kernel.execute(
        "import socket\ns = socket.create_connection(('127.0.0.1', 3128))\n"
        f"s.sendall(b'GET http://127.0.0.1:{allowed.port}/host HTTP/1.1\\r\\n'\n"
        f"          b'Host: 127.0.0.2:{other.port}\\r\\n\\r\\n')\n"
        "s.recv(300)"
    )
    assert "403" in got.result_text and "is not the URL's host" in got.result_text, got.texts()
    assert "/host" not in allowed.paths and other.connections == before


def test_no_packet_leaves_but_through_the_proxy(kernel, home):
    """Raw sockets, UDP (DNS exfiltration), a resolver, other Unix sockets: nothing reaches the host."""
    abstract = f"\0capsule-test-{uuid.uuid4().hex}"
    (home / "sockets").mkdir(exist_ok=True)
    path = str(home / "sockets" / "outside.sock")
    with closing_all(UdpListener(), UnixListener(abstract), UnixListener(path)) as (udp, abstract_listener, by_path):
        code = f"""
import socket
found = {{}}
def attempt(name, call):
    try:
        call()
        found[name] = "sent"
    except OSError as err:
        found[name] = type(err).__name__
def udp(address):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"exfiltrated", address)
def unix(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(address)
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
attempt("resolve", lambda: socket.getaddrinfo("pypi.org", 443))
for _ in range(20):
    attempt("udp_host", lambda: udp(("127.0.0.1", {udp.port})))
attempt("udp_dns", lambda: udp(("8.8.8.8", 53)))
attempt("abstract", lambda: unix({abstract!r}))
attempt("by_path", lambda: unix({path!r}))
found
"""
        got = kernel.execute(code)
        found = eval(got.result_text)  # a dict the cell printed
        assert found["raw"] == "PermissionError" and found["packet"] == "PermissionError", found
        assert found["resolve"] == "gaierror" and found["udp_dns"] == "OSError", found
        assert found["abstract"] == "ConnectionRefusedError" and found["by_path"] == "FileNotFoundError", found
        assert udp.seen() == []  # 127.0.0.1 inside is the sandbox's own loopback
        assert abstract_listener.accepted() == 0 and by_path.accepted() == 0


def test_a_flood_of_the_proxy_slows_only_the_sandbox(kernel, servers):
    """Hundreds of connections at once, heads that never end or never stop: the kernel answers, its memory stays."""
    allowed, _, _ = servers
    rss_before = psutil.Process(kernel_pid(kernel)).memory_info().rss
    flood = kernel.execute(
        "import socket, threading\n"
        "held = []\n"
        "def hold():\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect('/run/capsule/proxy.sock')\n"
        "    s.send(b'GET http://x')\n"  # a head that never ends
        "    held.append(s)\n"
        "def huge():\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect('/run/capsule/proxy.sock')\n"
        "    try:\n"
        "        s.sendall(b'GET http://x/ HTTP/1.1\\r\\n' + b'X: ' + b'a' * (8 << 20))\n"
        "    except OSError:\n"
        "        pass\n"
        "    held.append(s)\n"
        "threads = [threading.Thread(target=f) for f in [hold] * 300 + [huge] * 20]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "len(held)"
    )
    assert flood.status == "ok", flood.texts()
    # While those are held open, the kernel answers cells and magics at once.
    assert kernel.execute("1 + 1", timeout=30).result_text == "2"
    assert kernel.execute("%capsule status", timeout=30).status == "ok"
    assert psutil.Process(kernel_pid(kernel)).memory_info().rss < rss_before + 64 * 1024 * 1024
    # Once the stalled heads time out, an allowed request goes through again.
    got = kernel.execute(
        "import time, urllib.request\nfor s in held: s.close()\n"
        "deadline = time.monotonic() + 60\n"
        "while True:\n"
        "    try:\n"
        f"        print(urllib.request.urlopen('{allowed.url}/after-flood').read().decode()); break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline: raise\n"
        "        time.sleep(0.2)\n",
        timeout=90,
    )
    assert "hello from the host" in got.stdout, got.texts()


# The system's Python: a stranger may not be able to reach the project's virtualenv.
STRANGER_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.getuid() != 0, reason="another host user can be played only by root")
def test_no_other_host_user_can_use_a_notebooks_proxy(kernel):
    """The audit puts every request on the notebook: only the sandbox's uid may connect to its socket."""
    assert kernel.execute("1").status == "ok"
    sockets = [
        Path(found.laddr)
        for found in psutil.Process(kernel_pid(kernel)).net_connections(kind="unix")
        if isinstance(found.laddr, str) and found.laddr.endswith("/proxy.sock")
    ]
    assert sockets, "the kernel listens on no proxy socket"
    probe = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('connected')"
    for path in sockets:
        stranger = subprocess.run(
            [STRANGER_PYTHON, "-c", probe, str(path)], user=65000, group=65000, capture_output=True, text=True
        )
        assert "PermissionError" in stranger.stderr and "connected" not in stranger.stdout, (path, stranger)


def test_a_forged_or_tampered_audit_row_is_never_shown_as_a_request(kernel, home, servers):
    _, other, _ = servers
    refused = kernel.execute(f"import urllib.request\nurllib.request.urlopen('{other.url}/to-be-flipped')")
    assert refused.status == "error"
    forged = kernel.execute(
        FORGE + "forge({'type': 'network', 'cell': 1, 'method': 'GET', 'host': 'forged.example', 'port': 443,"
        " 'allowed': True, 'reason': 'allowed', 'address': '1.2.3.4', 'sent': 1, 'received': 1, 'at': 1.0})\n"
        "import time\nfor _ in range(300):\n    time.sleep(0.1)"
    )
    assert forged.status == "error" and forged.content["ename"] == "SandboxProtocolError", forged.texts()
    assert "forged.example" not in network_rows(kernel)
    # A row written into the store by anything without the key (not a sandbox: it cannot see the store).
    db = sqlite3.connect(home / "capsule" / "network.sqlite")
    with db:
        db.execute(
            "INSERT INTO network (session, task, at, cell, method, host, port, allowed, reason, address, sent,"
            " received, mac)"
            " VALUES ('allowed-hosts-a', '', 1.0, 1, 'GET', 'tampered.example', 443, 1, 'allowed', '', 0, 0, 'f00d')"
        )
        db.execute("UPDATE network SET allowed = 1 WHERE allowed = 0 AND host LIKE '127.0.0.2%'")
    db.close()
    rows = network_rows(kernel)
    assert "tampered.example" not in rows and rows.count("fails its MAC") >= 2, rows
    # A refusal turned into "allowed" is shown as tampered, never as an allowed request.
    assert not [line for line in rows.splitlines() if "127.0.0.2" in line and " allowed" in line], rows


def test_a_name_that_resolves_to_an_unlisted_local_address_is_refused(servers, home):
    """DNS rebinding, SSRF: `localhost` is allowed by name, but 127.0.0.1 is not listed."""
    allowed, _, _ = servers
    env = {
        "CAPSULE_HOME": str(home / "capsule"),
        "CAPSULE_SESSION": "allowed-hosts-b",
        "CAPSULE_NETWORK": f"localhost:{allowed.port}",
    }
    other = start_kernel(env=env, cwd=home / "work")
    try:
        before = allowed.connections
        got = other.execute(
            f"import requests\nrequests.get('http://localhost:{allowed.port}/rebound').raise_for_status()"
        )
        assert got.status == "error", got.texts()
        assert "resolves to 127.0.0.1, a private or local address that is not in the allowed hosts" in got.texts()
        assert allowed.connections == before and "/rebound" not in allowed.paths
        # Two notebooks on one CAPSULE_HOME: this one's audit shows its requests, never the other's.
        rows = network_rows(other)
        assert "/rebound" not in rows and f"localhost:{allowed.port}" in rows
        assert "127.0.0.2" not in rows and "urllib" not in rows
    finally:
        other.close()


def test_a_notebook_may_narrow_the_hosts_never_widen_them(kernel, servers):
    allowed, _, _ = servers
    widened = kernel.execute("%capsule limits --network pypi.org")
    assert widened.status == "error" and "pypi.org is not within the operator's allowed hosts" in widened.texts()
    widened = kernel.execute("%capsule limits --network on")
    assert widened.status == "error" and "a notebook may only narrow it" in widened.texts()
    narrowed = kernel.execute(f"%capsule limits --network 127.0.0.1:{allowed.port}")
    assert narrowed.status == "ok", narrowed.texts()
    assert kernel.execute("%capsule restart").status == "ok"
    status = kernel.execute("%capsule status").texts()
    assert f"only 127.0.0.1:{allowed.port}" in status, status
    before = allowed.connections
    got = kernel.execute(f"import urllib.request\nurllib.request.urlopen('http://localhost:{allowed.port}/narrowed')")
    assert got.status == "error" and f"localhost:{allowed.port} is not in the allowed hosts" in got.texts()
    assert allowed.connections == before
    got = kernel.execute(f"import urllib.request\nurllib.request.urlopen('{allowed.url}/still').read()")
    assert "hello from the host" in got.result_text, got.texts()


def test_the_network_setting_is_checked_when_it_is_read(tmp_path):
    """A wrong list is a clear error at start-up, not an open network."""
    kernel = start_kernel(env={"CAPSULE_HOME": str(tmp_path / "home"), "CAPSULE_NETWORK": "*, pypi.org"}, cwd=tmp_path)
    try:
        status = kernel.execute("%capsule status").texts()
        assert "network" in status and "only" not in status.split("limit: network")[1].split("\n")[0]
        got = kernel.execute("import socket\nsocket.getaddrinfo('pypi.org', 443)")
        assert got.status == "error"
    finally:
        kernel.close()


# -- tasks ---------------------------------------------------------------------------------


def test_a_task_inherits_the_list_and_its_envelope_lists_its_requests(kernel, servers):
    from tests.test_tasks import envelope_of, valid

    allowed, other, _ = servers
    before = other.connections
    result = kernel.execute(
        "%%capsule task fetched --sandbox subprocess\n"
        "import urllib.request\n"
        f"body = urllib.request.urlopen('{allowed.url}/from-a-task').read().decode()\n"
        "try:\n"
        f"    urllib.request.urlopen('{other.url}/refused-from-a-task')\n"
        "except OSError as err:\n"
        "    refused = str(err)\n"
        "return [body, refused]"
    )
    envelope = valid(envelope_of(result))
    assert envelope["success"], envelope
    body, refused = envelope["result"]
    assert "hello from the host" in body and f"127.0.0.2:{other.port} is not in the allowed hosts" in refused
    requests = envelope["execution"]["host_requests"]
    assert [(r["host"], r["allowed"]) for r in requests] == [("127.0.0.1", True), ("127.0.0.2", False)], requests
    assert other.connections == before and "/from-a-task" in allowed.paths
    assert "task fetched" in network_rows(kernel)


def test_a_task_may_narrow_the_hosts_never_widen_them(kernel, servers):
    from tests.test_tasks import envelope_of, valid

    allowed, _, _ = servers
    widened = kernel.execute("%%capsule task wide --sandbox subprocess --allowed-hosts pypi.org\nreturn 1")
    assert widened.status == "error" and "pypi.org is not within the operator's allowed hosts" in widened.texts()
    before = allowed.connections
    narrowed = kernel.execute(
        f"%%capsule task narrow --sandbox subprocess --allowed-hosts 127.0.0.1:{allowed.port}\n"
        "import urllib.request\n"
        "try:\n"
        f"    urllib.request.urlopen('http://localhost:{allowed.port}/by-name-from-a-task')\n"
        "except OSError as err:\n"
        "    return str(err)"
    )
    envelope = valid(envelope_of(narrowed))
    assert f"localhost:{allowed.port} is not in the allowed hosts (the task's allowed hosts)" in envelope["result"]
    assert allowed.connections == before
    # @task says the same in Python.
    got = kernel.execute(
        "from capsule_kernel.tasks import task\n"
        f"@task(sandbox='subprocess', allowed_hosts=['127.0.0.1:{allowed.port}'])\n"
        "def fetch(path):\n"
        "    import urllib.request\n"
        f"    return urllib.request.urlopen('{allowed.url}' + path).read().decode()\n"
        "fetch('/from-at-task')"
    )
    assert "hello from the host" in got.result_text, got.texts()
    assert "/from-at-task" in allowed.paths
