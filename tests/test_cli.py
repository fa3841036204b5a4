"""capsule-kernel install / uninstall / --version, and both -f forms."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from capsule_kernel import __version__

BIN = Path(sys.executable).parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def test_version():
    result = run(str(BIN / "capsule-kernel"), "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"capsule-kernel {__version__}"


def test_install_prefix_then_kernelspec_list_then_uninstall(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_PATH"}
    env["JUPYTER_PATH"] = str(tmp_path / "share" / "jupyter")
    installed = run(
        str(BIN / "capsule-kernel"), "install", "--prefix", str(tmp_path), "--name", "capsule-cli-test", env=env
    )
    assert installed.returncode == 0, installed.stderr
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "capsule-cli-test"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"] == [sys.executable, "-P", "-m", "capsule_kernel", "-f", "{connection_file}"]
    assert spec["display_name"] == "Capsule (sandboxed Python)"
    assert spec["language"] == "python"
    assert spec["metadata"]["debugger"] is False
    assert (spec_dir / "logo-64x64.png").is_file() and (spec_dir / "logo-32x32.png").is_file()
    listed = run(str(BIN / "jupyter"), "kernelspec", "list", "--json", env=env)
    assert "capsule-cli-test" in json.loads(listed.stdout)["kernelspecs"]
    removed = run(str(BIN / "capsule-kernel"), "uninstall", "--name", "capsule-cli-test", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not spec_dir.exists()
    again = run(str(BIN / "capsule-kernel"), "uninstall", "--name", "capsule-cli-test", env=env)
    assert again.returncode == 1 and "No kernelspec named" in again.stderr


def test_install_display_name_and_user(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), JUPYTER_DATA_DIR=str(tmp_path / "data"))
    result = run(str(BIN / "capsule-kernel"), "install", "--user", "--display-name", "Sandboxed", env=env)
    assert result.returncode == 0, result.stderr
    spec = json.loads((tmp_path / "data" / "kernels" / "capsule" / "kernel.json").read_text())
    assert spec["display_name"] == "Sandboxed"


def _wait_for_kernel_info(client: BlockingKernelClient, timeout: float) -> None:
    """Its kernel_info reply, however long start-up takes on a loaded machine.

    Not client.wait_for_ready: for a client without a KernelManager it calls the
    kernel dead as soon as one heartbeat is late after a second without a reply
    (seen in CI: "Kernel died before replying to kernel_info" while it started).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.kernel_info()
        with contextlib.suppress(queue.Empty):
            if client.get_shell_msg(timeout=1)["msg_type"] == "kernel_info_reply":
                return
    raise AssertionError(f"no kernel_info reply within {timeout} s")


def _start_and_talk(tmp_path: Path, flag_form: list[str]) -> None:
    connection_file = str(tmp_path / "kernel.json")
    write_connection_file(connection_file)
    process = subprocess.Popen([sys.executable, "-m", "capsule_kernel", *flag_form(connection_file)], cwd=tmp_path)
    client = BlockingKernelClient(connection_file=connection_file)
    client.load_connection_file()
    client.start_channels()
    try:
        _wait_for_kernel_info(client, timeout=60)
        reply = client.execute_interactive("6 * 7", timeout=60)
        assert reply["content"]["status"] == "ok"
        client.shutdown()
        assert process.wait(timeout=60) == 0
    finally:
        client.stop_channels()
        if process.poll() is None:
            process.kill()


def test_module_starts_with_dash_f(tmp_path):
    _start_and_talk(tmp_path, lambda path: ["-f", path])


def test_module_starts_with_vscode_flag_form(tmp_path):
    _start_and_talk(tmp_path, lambda path: [f"--f={path}"])


def test_install_env_writes_operator_settings_that_the_kernel_enforces(tmp_path):
    """--env K=V lands in kernel.json; a kernel started from that spec runs under it (a locked Wasm mode)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    from tests.harness import KernelHarness

    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_PATH"}
    env["JUPYTER_PATH"] = str(tmp_path / "share" / "jupyter")
    installed = run(
        str(BIN / "capsule-kernel"),
        "install",
        "--prefix",
        str(tmp_path),
        "--name",
        "capsule-env-test",
        "--env",
        "CAPSULE_MODE=wasm",
        "--env",
        "CAPSULE_LOCK_MODE=1",
        env=env,
    )
    assert installed.returncode == 0, installed.stderr
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "capsule-env-test"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["env"] == {"CAPSULE_MODE": "wasm", "CAPSULE_LOCK_MODE": "1"}
    bad = run(str(BIN / "capsule-kernel"), "install", "--prefix", str(tmp_path), "--env", "no-equals", env=env)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
    km = KernelManager(
        kernel_name="capsule-env-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
    )
    km.start_kernel(cwd=str(tmp_path))
    kernel = KernelHarness(km)
    try:
        assert kernel.execute("1").metadata["capsule"]["sandbox"] == "wasm"
        refused = kernel.execute("%capsule mode subprocess")
        assert refused.status == "error" and "locked" in refused.content["evalue"]
    finally:
        kernel.close()
