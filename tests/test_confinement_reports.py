"""What Capsule says about confinement, and what it refuses when the operator requires it."""

from __future__ import annotations


def test_an_unconfined_sandbox_says_so_on_the_first_cell_and_in_status(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_CONFINEMENT": "off"})
    first = kernel.execute("1 + 1")
    assert first.result_text == "2"
    assert "not a security boundary here: switched off by the operator" in first.stderr
    assert "not a security boundary" not in kernel.execute("2 + 2").stderr  # once
    status = kernel.execute("%capsule status").texts()
    assert "confinement     not a security boundary here" in status


def test_require_confinement_refuses_to_run_cells(fresh_kernel, tmp_path):
    marker = tmp_path / "ran"
    kernel = fresh_kernel(env={"CAPSULE_CONFINEMENT": "off", "CAPSULE_REQUIRE_CONFINEMENT": "1"})
    result = kernel.execute(f"open({str(marker)!r}, 'w').close()")
    assert result.status == "error"
    assert result.content["ename"] == "SandboxUnavailable"
    assert "require_confinement = true" in result.content["evalue"]
    assert not marker.exists()
    assert kernel.km.is_alive()


def test_a_confined_sandbox_reports_every_measure(kernel):
    status = kernel.execute("%capsule status").texts()
    for measure in ("confinement", "user", "namespaces", "capabilities", "seccomp", "filesystem", "cgroup"):
        line = next(line for line in status.splitlines() if line.startswith(measure + " "))
        assert "enforced" in line, line
