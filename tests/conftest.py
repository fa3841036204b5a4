"""Shared fixtures: real capsule kernels, isolated from the user's profile."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from capsule_kernel.client.cli import build_kernelspec
from tests.harness import KernelHarness, start_kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_jupyter(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Own IPython profile, own data dir; capsule kernelspec guaranteed present.

    The README's setup installs the kernelspec into the virtualenv; if this
    interpreter has none, tests install one pointing at this interpreter in a
    private JUPYTER_PATH, plus a message-mode twin for interrupt tests.
    """
    home = tmp_path_factory.mktemp("jupyter")
    os.environ["IPYTHONDIR"] = str(home / "ipython")
    os.environ["MPLCONFIGDIR"] = str(home / "mpl")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(home / "runtime")
    os.environ["CAPSULE_HOME"] = str(home / "capsule")
    specs = home / "share" / "kernels"
    try:
        spec = KernelSpecManager().get_kernel_spec("capsule")
        if spec.argv[0] != sys.executable:
            raise NoSuchKernel("capsule")
    except NoSuchKernel:
        build_kernelspec(specs / "capsule", "Capsule (sandboxed Python)", sys.executable)
    build_kernelspec(specs / "capsule-message", "Capsule (message interrupts)", sys.executable)
    spec_file = specs / "capsule-message" / "kernel.json"
    data = json.loads(spec_file.read_text())
    data["interrupt_mode"] = "message"
    spec_file.write_text(json.dumps(data))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(home / "share"), os.environ.get("JUPYTER_PATH", "")]).rstrip(
        os.pathsep
    )
    # The test process itself must not pick up the developer's capsule.toml.
    os.environ.pop("CAPSULE_MEMORY", None)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    """One kernel shared by a module's tests that leave its state alone."""
    harness = start_kernel(cwd=tmp_path_factory.mktemp("cwd"))
    yield harness
    harness.close()


@pytest.fixture
def fresh_kernel(tmp_path: Path):
    """A kernel of the test's own, for tests that kill or reconfigure things."""
    harnesses: list[KernelHarness] = []

    def start(
        env: dict[str, str] | None = None, kernel_name: str = "capsule", cwd: Path | None = None
    ) -> KernelHarness:
        harness = start_kernel(kernel_name, env=env, cwd=cwd or tmp_path)
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        harness.close()
