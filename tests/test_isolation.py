"""What the sandbox can and cannot see of the kernel."""

from __future__ import annotations


def test_worker_never_sees_the_connection_file_or_key(kernel):
    key = kernel.kc.session.key.decode()
    connection_file = kernel.km.connection_file
    probe = kernel.execute(
        "import os\n"
        "seen = open('/proc/self/cmdline', 'rb').read().decode(errors='replace') + repr(dict(os.environ))\n"
        "seen"
    )
    seen = probe.result_text
    assert key and key not in seen
    assert connection_file not in seen


def test_worker_runs_in_its_own_session(kernel):
    import os

    pid = kernel.sandbox_pid()
    kernel_pid = kernel.km.provisioner.process.pid
    # Its own session and process group (bubblewrap's --new-session): the
    # frontend's signals to the kernel's group never hit it directly.
    assert os.getsid(pid) != os.getsid(kernel_pid)
    assert os.getpgid(pid) != os.getpgid(kernel_pid)


def test_frames_are_json_not_pickles():
    """Rule 1 and 2 in code: the kernel's decoder only ever parses JSON."""
    import pickle

    import pytest

    from capsule_kernel.protocol import frames

    body = pickle.dumps({"type": "stream"})
    frame = frames.HEADER.pack(len(body)) + body
    with pytest.raises(frames.ProtocolError):
        frames.FrameDecoder().feed(frame)
