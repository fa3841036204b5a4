"""Each sandbox limit, hit for real, through a real kernel."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.harness import plain

PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


def limits_text(kernel) -> str:
    return kernel.execute("%capsule limits").texts()


def test_memory_limit_names_itself_and_keeps_the_namespace(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("survivor = 'still here'")
    assert kernel.execute("%capsule limits --memory 512MiB").status == "ok"
    result = kernel.execute("big = bytearray(2 * 1024**3)")
    assert result.status == "error"
    assert result.content["ename"] == "MemoryError"
    assert "the cell exceeded the sandbox memory limit of 512 MiB" in result.content["evalue"]
    assert "sandbox memory limit of 512 MiB" in plain("\n".join(result.error["traceback"]))
    assert kernel.execute("survivor").result_text == "'still here'"


@pytest.mark.slow
def test_cpu_limit_stops_a_busy_cell(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("kept = 1")
    kernel.execute("%capsule limits --cpu 1s")
    result = kernel.execute("while True:\n    pass", timeout=60)
    assert result.status == "error"
    assert result.content["ename"] == "CPULimitExceeded"
    assert "CPU limit of 1 s" in result.content["evalue"]
    assert "capsule_kernel" not in "\n".join(result.content["traceback"])
    # The limit is per cell: the next cells get their own second.
    assert kernel.execute("kept + 1").result_text == "2"
    assert kernel.execute("sum(range(1000))").status == "ok"
    again = kernel.execute("while True:\n    pass", timeout=60)
    assert again.content["ename"] == "CPULimitExceeded"
    assert "not enforced" not in limits_text(kernel).split("\ncpu", 1)[1].splitlines()[0]


@pytest.mark.slow
def test_timeout_interrupts_and_keeps_the_namespace(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("kept = 'yes'")
    kernel.execute("%capsule limits --timeout 1s")
    result = kernel.execute("import time\ndef wait():\n    time.sleep(30)\nwait()", timeout=30)
    assert result.status == "error"
    assert result.content["ename"] == "CellTimeout"
    assert "wall-clock limit of 1 s" in result.content["evalue"]
    assert result.replied - result.started < 15
    # The traceback ends where the user's code was, not in Capsule's signal handler (checked: it did).
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(result.content["traceback"]))
    assert "in wait" in traceback and "time.sleep(30)" in traceback
    assert "capsule_kernel" not in traceback and "_on_timeout" not in traceback, traceback
    assert kernel.execute("kept").result_text == "'yes'"


@pytest.mark.slow
def test_timeout_kills_a_cell_that_ignores_the_interrupt(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("kept = 1")  # a checkpoint to restore
    kernel.execute("%capsule limits --timeout 1s")
    old_pid = kernel.sandbox_pid()
    code = (
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
        "while True:\n    pass"
    )
    result = kernel.execute(code, timeout=60)
    assert result.status == "error"
    assert result.content["ename"] == "CellTimeout"
    evalue = result.content["evalue"]
    assert "did not stop within" in evalue and "killed" in evalue
    assert "was restored" in evalue
    assert kernel.sandbox_pid() != old_pid


def test_files_limit(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("%capsule limits --files 64")
    result = kernel.execute("handles = [open(__import__('os').devnull) for _ in range(200)]")
    assert result.status == "error"
    assert result.content["ename"] == "OSError"
    assert "the sandbox allows 64 open files (files limit)" in result.content["evalue"]
    assert kernel.execute("1 + 1").result_text == "2"


def _procs_enforceable() -> str | None:
    if os.geteuid() != 0:
        return None
    if os.access(PIDS_CGROUP, os.W_OK):
        return None
    return "running as root without a writable pids cgroup: the OS exempts root from RLIMIT_NPROC"


@pytest.mark.skipif(_procs_enforceable() is not None, reason=str(_procs_enforceable()))
def test_procs_limit(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_PROCS": "40"})
    status = limits_text(kernel)
    procs_line = next(line for line in status.splitlines() if line.startswith("procs"))
    assert "environment CAPSULE_PROCS" in procs_line
    assert "not enforced" not in procs_line
    code = (
        "import subprocess\nchildren = []\n"
        "try:\n"
        "    for _ in range(80):\n"
        "        children.append(subprocess.Popen(['sleep', '30']))\n"
        "finally:\n"
        "    started = len(children)\n"
        "    for child in children:\n"
        "        child.kill(); child.wait()\n"
    )
    result = kernel.execute(code)
    assert result.status == "error", result.texts()
    assert "procs limit" in result.content["evalue"]
    started = int(kernel.execute("started").result_text)
    assert 0 < started < 40


def test_network_is_off_but_loopback_works(kernel):
    status = limits_text(kernel)
    if "network  off" in status and "not enforced" in status.split("network", 1)[1].splitlines()[0]:
        pytest.skip("this OS gives the sandbox no network namespace")
    result = kernel.execute("import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=3)")
    assert result.status == "error"
    assert "unreachable" in result.content["evalue"].lower()
    loopback = kernel.execute(
        "import socket\nserver = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname(), timeout=3)\n"
        "conn, _ = server.accept(); client.sendall(b'ping'); conn.recv(4)"
    )
    assert loopback.result_text == "b'ping'"


def test_malformed_limit_changes_nothing(kernel):
    before = limits_text(kernel)
    result = kernel.execute("%capsule limits --memory 2GiB --timeout soon")
    assert result.status == "error"
    assert result.content["ename"] == "UsageError"
    assert "invalid duration 'soon'" in result.content["evalue"]
    assert "\n" not in result.content["evalue"]
    assert limits_text(kernel) == before


def test_limits_show_where_values_came_from(fresh_kernel, tmp_path):
    (tmp_path / "capsule.toml").write_text('[limits]\ntimeout = "45s"\nfiles = 300\nmemory = "lots"\n')
    kernel = fresh_kernel(env={"CAPSULE_FILES": "400"}, cwd=tmp_path)
    text = limits_text(kernel)
    lines = {
        line.split()[0]: line
        for line in text.splitlines()
        if line and line.split()[0] in ("timeout", "files", "memory")
    }
    assert "45 s" in lines["timeout"] and "capsule.toml" in lines["timeout"]
    assert "400" in lines["files"] and "environment CAPSULE_FILES" in lines["files"]
    assert "default" in lines["memory"]
    assert "warning" in text and "invalid size 'lots'" in text
    kernel.execute("%capsule limits --files 128")
    assert "%capsule limits" in next(line for line in limits_text(kernel).splitlines() if line.startswith("files"))


def test_pyproject_tool_capsule_is_read(fresh_kernel, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.capsule.limits]\ncpu = "2m"\n')
    sub = tmp_path / "analysis"
    sub.mkdir()
    kernel = fresh_kernel(cwd=sub)
    line = next(line for line in limits_text(kernel).splitlines() if line.startswith("cpu"))
    assert "2 min" in line and "pyproject.toml [tool.capsule]" in line


def test_status_reports_the_sandbox(kernel):
    kernel.execute("1")
    text = kernel.execute("%capsule status").texts()
    assert "sandbox         subprocess" in text
    pid = kernel.sandbox_pid()
    assert f"pid             {pid}" in kernel.execute("%capsule status").texts()
    for field in ("uptime", "memory in use", "cells run", "limit: memory", "limit: timeout"):
        assert field in text


def test_capsule_help_lists_subcommands(kernel):
    for code in ("%capsule", "%capsule --help", "%capsule help"):
        text = kernel.execute(code).texts()
        for sub in ("status", "limits", "restart"):
            assert sub in text


def test_unknown_subcommand_is_a_one_line_error(kernel):
    result = kernel.execute("%capsule frobnicate")
    assert result.status == "error"
    assert "invalid choice: 'frobnicate'" in result.content["evalue"]


def test_capsule_magic_inside_a_cell_with_code(kernel):
    result = kernel.execute("before = 1\n%capsule status\nafter = 2")
    assert result.status == "ok"
    assert "Capsule status" in result.texts()
    assert kernel.execute("before + after").result_text == "3"
    bad = kernel.execute("x = 1\n%capsule limits --cpu never")
    assert bad.status == "error" and "invalid duration 'never'" in bad.content["evalue"]


def test_restart_gives_a_fresh_namespace(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("gone_after_restart = 1")
    old = kernel.sandbox_pid()
    assert "namespace was reset" in kernel.execute("%capsule restart").texts()
    assert kernel.sandbox_pid() != old
    assert kernel.execute("gone_after_restart").content["ename"] == "NameError"


@pytest.mark.skipif(shutil.which("sleep") is None, reason="needs the sleep command")
def test_shell_children_die_with_a_killed_sandbox(fresh_kernel):
    from tests.harness import wait_until
    from tests.security.helpers import processes_with

    tag = f"sleep {300000 + os.getpid() % 10000}"
    kernel = fresh_kernel()
    kernel.execute(f"import subprocess\nchild = subprocess.Popen({tag.split()!r})")
    # Inside its PID namespace the child has another pid: find it on the host by its command line.
    wait_until(lambda: processes_with(tag), what="the sandbox's child process to start")
    kernel.execute("%capsule restart")

    def gone() -> bool:
        for pid in processes_with(tag):
            try:
                if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z":
                    return False
            except OSError:
                continue
        return True

    wait_until(gone, what="the sandbox's child process to end")


def test_network_can_be_switched_on_with_a_restart(fresh_kernel):
    # A notebook switches the network on only where the operator allows it (policy.py).
    kernel = fresh_kernel(env={"CAPSULE_NOTEBOOK_MAY_WIDEN": "network"})
    text = kernel.execute("%capsule limits --network on").texts()
    assert "applies after %capsule restart" in text
    kernel.execute("%capsule restart")
    network_line = next(line for line in limits_text(kernel).splitlines() if line.startswith("network"))
    assert "on" in network_line and "allowed" in network_line
