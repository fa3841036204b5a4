"""The trusted side of confinement, piece by piece: command line, ACLs, chunk adoption, chunk server."""

from __future__ import annotations

import array
import asyncio
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from capsule_kernel.kernel.checkpoint.store import CheckpointStore
from capsule_kernel.kernel.sandbox import chunk_server, confinement, seccomp, workdir_acl
from capsule_kernel.protocol.chunks import chunk_path
from tests.harness import wait_until


def policy(tmp_path: Path, **changes) -> confinement.Policy:
    values = {
        "workdir": tmp_path / "work",
        "identity": confinement.Identity(65533, 65533, switch=True),
        "environment": {"PATH": "/usr/bin"},
        "python_paths": (Path("/usr/lib/python3"),),
    }
    values.update(changes)
    values["workdir"].mkdir(exist_ok=True)
    return confinement.Policy(**values)


def test_the_command_line_unshares_everything_and_drops_root(tmp_path):
    argv = confinement.launch_command(policy(tmp_path), ["python"], confinement.LaunchFds(), "/usr/bin/bwrap")
    assert argv[:3] == ["/bin/sh", "-c", confinement._LAUNCH]
    assert "--reuid=65533" in argv
    for flag in (
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-net",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
    ):
        assert flag in argv
    assert argv[-2:] == ["--", "python"]


def test_network_on_keeps_the_host_network(tmp_path):
    argv = confinement.bwrap_arguments(policy(tmp_path, network=True), confinement.LaunchFds())
    assert "--unshare-net" not in argv


def test_secrets_inside_a_bound_directory_are_covered(tmp_path):
    home = tmp_path / "work"
    home.mkdir()
    (home / ".ssh").mkdir()
    (home / ".bashrc").write_text("secret")
    hidden = confinement.hidden_paths(home, [])
    argv = confinement.bwrap_arguments(policy(tmp_path, workdir=home, hidden=hidden), confinement.LaunchFds())
    text = " ".join(argv)
    assert f"--tmpfs {home / '.ssh'}" in text
    assert f"--ro-bind /dev/null {home / '.bashrc'}" in text


def test_a_trusted_import_path_inside_the_working_directory_is_shown_read_only(tmp_path):
    work = tmp_path / "work"
    package = work / "src"
    package.mkdir(parents=True)
    argv = confinement.bwrap_arguments(policy(tmp_path, workdir=work, python_paths=(package,)), confinement.LaunchFds())
    binds = [argv[i : i + 3] for i, arg in enumerate(argv) if arg in ("--bind", "--ro-bind")]
    assert ["--bind", str(work), str(work)] in binds
    # The read-only bind of the package comes after the writable working directory, so it wins.
    assert binds.index(["--ro-bind", str(package), str(package)], binds.index(["--bind", str(work), str(work)]))


def test_the_operators_config_file_in_a_writable_directory_is_read_only(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "capsule.toml").write_text("[limits]\nmemory = '1GiB'\n")
    argv = confinement.bwrap_arguments(policy(tmp_path, workdir=work), confinement.LaunchFds())
    assert " ".join(argv).count(f"--ro-bind {work / 'capsule.toml'} {work / 'capsule.toml'}") == 1


def test_the_environment_is_an_allowlist():
    env = confinement.sandbox_environment(
        {"PATH": "/bin", "LC_ALL": "C", "AWS_SECRET_ACCESS_KEY": "x", "PYTHONSTARTUP": "evil.py", "KEPT": "1"},
        {"EXTRA": "2"},
        ["KEPT"],
    )
    assert env["PATH"] == "/bin" and env["LC_ALL"] == "C" and env["KEPT"] == "1" and env["EXTRA"] == "2"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "PYTHONSTARTUP" not in env
    assert env["HOME"] == str(confinement.SANDBOX_HOME)


def test_a_descriptor_bound_twice_is_copied(tmp_path):
    fds = confinement.LaunchFds()
    fds.paths[tmp_path] = os.open(tmp_path, os.O_PATH)
    try:
        first = fds.bind(tmp_path, writable=False)
        second = fds.bind(tmp_path, writable=True)
        assert first[1] != second[1]  # bubblewrap closes a descriptor once it has used it
        assert len(fds.all()) == 2
    finally:
        for fd in fds.all():
            os.close(fd)


def test_the_seccomp_program_compiles_and_denies_ptrace():
    program = seccomp.program()
    assert program.available, program.problem
    assert "ptrace" in program.denied and "bpf" in program.denied and "userfaultfd" in program.denied
    assert len(program.bpf) > 0 and len(program.bpf) % 8 == 0  # struct sock_filter is 8 bytes


@pytest.mark.skipif(os.getuid() != 0, reason="adding ACL entries for another uid needs root")
def test_acl_entries_let_the_sandbox_uid_in_and_through(tmp_path):
    inner = tmp_path / "locked" / "work"
    inner.mkdir(parents=True)
    (tmp_path / "locked").chmod(0o700)
    assert "read-write" in workdir_acl.grant(inner, 65533)
    assert tmp_path / "locked" in workdir_acl.ensure_passage(inner, 65533)
    assert workdir_acl.ensure_passage(inner, 65533) == []  # once is enough
    entries = workdir_acl._parse(os.getxattr(inner, "system.posix_acl_access"))
    assert entries[(0x02, 65533)] == 7
    passage = workdir_acl._parse(os.getxattr(tmp_path / "locked", "system.posix_acl_access"))
    assert passage[(0x02, 65533)] == 1  # search only: pass through, never list


def _write(path: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    target = chunk_path(path, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return digest


def test_adoption_copies_a_sound_chunk_and_drops_a_forged_one(tmp_path):
    store = CheckpointStore(tmp_path / "home")
    spool = tmp_path / "spool"
    good = _write(spool, b"good bytes")
    forged = hashlib.sha256(b"what it claims").hexdigest()
    chunk_path(spool, forged).parent.mkdir(parents=True, exist_ok=True)
    chunk_path(spool, forged).write_bytes(b"something else")
    bad = store.adopt(spool, {"a": {"pickle": [good]}, "b": {"pickle": [forged]}})
    assert bad == [forged]
    assert chunk_path(store.chunks, good).read_bytes() == b"good bytes"
    assert not chunk_path(store.chunks, forged).exists()
    assert not chunk_path(spool, good).exists()  # emptied as adopted


def test_adoption_never_follows_a_link_out_of_the_spool(tmp_path):
    store = CheckpointStore(tmp_path / "home")
    spool = tmp_path / "spool"
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    digest = hashlib.sha256(b"host secret").hexdigest()
    chunk_path(spool, digest).parent.mkdir(parents=True)
    chunk_path(spool, digest).symlink_to(secret)
    assert store.adopt(spool, {"a": {"pickle": [digest]}}) == [digest]
    assert not chunk_path(store.chunks, digest).exists()


def test_adopted_chunks_are_a_copy_not_the_sandboxes_file(tmp_path):
    store = CheckpointStore(tmp_path / "home")
    spool = tmp_path / "spool"
    digest = _write(spool, b"original")
    held = open(chunk_path(spool, digest), "r+b")  # the sandbox keeps it open for writing
    try:
        assert store.adopt(spool, {"a": {"pickle": [digest]}}) == []
        held.write(b"tampered")
        held.flush()
    finally:
        held.close()
    assert chunk_path(store.chunks, digest).read_bytes() == b"original"


def _ask(sock: socket.socket, digest: str) -> tuple[dict, list[int]]:
    sock.sendmsg([json.dumps({"type": "open_chunk", "digest": digest}).encode()])
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for _, _, payload in ancillary:
        fds.frombytes(payload)
    return json.loads(data), list(fds)


@pytest.mark.parametrize("copy", [False, True])
def test_the_chunk_server_serves_only_the_restore_in_progress(tmp_path, copy):
    root = tmp_path / "chunks"
    allowed = _write(root, b"restore me")
    other = _write(root, b"another session's data")
    kernel_end, worker_end = chunk_server.socket_pair()
    violations: list[str] = []

    async def scenario() -> None:
        server = chunk_server.ChunkServer(kernel_end, root, copy=copy, on_violation=violations.append)
        server.start(asyncio.get_running_loop())
        loop = asyncio.get_running_loop()
        with server.serving([allowed]):
            answer, fds = await loop.run_in_executor(None, _ask, worker_end, allowed)
            assert answer["ok"] and len(fds) == 1
            assert os.pread(fds[0], 100, 0) == b"restore me"
            with pytest.raises(OSError):
                os.write(fds[0], b"x")  # read-only (or sealed)
            os.close(fds[0])
            answer, fds = await loop.run_in_executor(None, _ask, worker_end, other)
            assert not answer["ok"] and fds == []
        answer, fds = await loop.run_in_executor(None, _ask, worker_end, allowed)
        assert not answer["ok"] and fds == []  # the restore is over
        server.close()

    asyncio.run(scenario())
    worker_end.close()
    assert violations == []


def test_a_malformed_chunk_request_ends_the_sandbox(tmp_path):
    kernel_end, worker_end = chunk_server.socket_pair()
    violations: list[str] = []

    async def scenario() -> None:
        stopped = asyncio.Event()

        def on_violation(reason: str) -> None:
            violations.append(reason)
            stopped.set()

        server = chunk_server.ChunkServer(kernel_end, tmp_path, copy=False, on_violation=on_violation)
        server.start(asyncio.get_running_loop())
        worker_end.send(b"\x00" * 4000)  # oversized garbage
        await asyncio.wait_for(stopped.wait(), timeout=10)

    asyncio.run(scenario())
    worker_end.close()
    assert violations and "chunk protocol" in violations[0]


def test_a_config_file_changed_during_a_cell_is_distrusted(tmp_path, monkeypatch):
    from capsule_kernel.kernel.limit_settings import find_config_file
    from capsule_kernel.kernel.policy_files import PolicyFileWatch

    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    (work / "capsule.toml").write_text("[limits]\nmemory = '1GiB'\n")
    monkeypatch.setenv("CAPSULE_HOME", str(home))
    watch = PolicyFileWatch(work, home)
    assert watch.check() == []
    assert find_config_file(work)[0] == work / "capsule.toml"
    (work / "capsule.toml").write_text("[limits]\nmemory = 'unlimited'\n")  # as a cell would
    assert watch.check() == ["capsule.toml"]
    assert find_config_file(work) is None  # same uid as the kernel, but seen changing under a sandbox
    (work / "capsule.toml").write_text("[limits]\nmemory = '2GiB'\n")  # the user, with no kernel running
    assert find_config_file(work)[0] == work / "capsule.toml"


def test_a_same_size_rewrite_with_its_old_mtime_is_still_seen(tmp_path, monkeypatch):
    """The watch skips hashing unchanged files by their stat; a cell cannot make a change look unchanged.

    The rewrite keeps the inode, the size and (os.utime) the mtime; only ctime
    moves, and only the kernel's clock can tell. Checked with the ctime left
    out of the identity: the change went unseen.
    """
    import time

    from capsule_kernel.kernel import policy_files
    from capsule_kernel.kernel.policy_files import PolicyFileWatch

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    config = work / "capsule.toml"
    config.write_text("[limits]\nmemory = '1GiB'\n")
    watch = PolicyFileWatch(work, home)
    # Long after: the first state is settled (not "racy"), so the next check trusts the stat.
    later = time.time_ns() + 10 * policy_files._RACY_NS
    monkeypatch.setattr(policy_files.time, "time_ns", lambda: later)
    assert watch.check() == []
    before = os.stat(config)

    def rewrite() -> bool:
        with open(config, "r+b") as handle:  # in place: the same inode
            handle.write(b"[limits]\nmemory = '9GiB'\n")
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
        return os.stat(config).st_ctime_ns != before.st_ctime_ns  # the file system's clock ticked

    wait_until(rewrite, timeout=5, what="a rewrite in a later ctime tick")
    after = os.stat(config)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert watch.check() == ["capsule.toml"]


def test_a_file_changed_within_the_ctime_tick_is_hashed_again(tmp_path):
    """A ctime close to now may hide a second write in the same clock tick: such a file is always re-hashed."""
    from capsule_kernel.kernel.policy_files import PolicyFileWatch

    work = tmp_path / "work"
    work.mkdir()
    config = work / "capsule.toml"
    config.write_text("a = 1\n")
    watch = PolicyFileWatch(work, tmp_path / "home")
    before = os.stat(config)
    with open(config, "r+b") as handle:
        handle.write(b"a = 2\n")
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    # Even if the ctime did not move (same tick), the file is recent, so it is hashed: the change is seen.
    assert watch.check() == ["capsule.toml"]
