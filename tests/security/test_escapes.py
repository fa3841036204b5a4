"""Attacks from inside the subprocess sandbox, one per test, through real kernels.

Each test asserts that the attack's observable effect did not happen on the
host: the kernel and a sentinel process are alive and untraced, a planted
secret was not read, a file outside the sandbox is unchanged, a listener
received nothing, memory stayed under the limit, planted code never ran in
a trusted process, no process outlived its sandbox.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.harness import wait_until
from tests.security.helpers import (
    Sentinel,
    digest,
    kernel_pid,
    processes_with,
    sandbox_cgroups,
    status_field,
    wait_gone,
)

pytestmark = pytest.mark.slow

SECRET = f"capsule-secret-{uuid.uuid4().hex}"


@pytest.fixture
def sentinel():
    process = Sentinel()
    yield process
    process.stop()


@pytest.fixture
def secret_home(tmp_path):
    """A HOME for the kernel holding the files an attacker wants."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text(SECRET)
    (home / ".bashrc").write_text(f"export TOKEN={SECRET}\n")
    return home


def run(kernel, code: str):
    result = kernel.execute(code, timeout=120)
    return result, result.texts()


def execute_in_background(kernel, code: str, started_when: str | None = None):
    """Run a cell on a thread; return (thread, results list, event set once `started_when` is printed)."""
    results: list = []
    printed = threading.Event()

    def on_message(message) -> None:
        if message.msg_type == "stream" and started_when and started_when in message.content.get("text", ""):
            printed.set()

    def target() -> None:
        results.append(kernel.execute(code, timeout=120, on_message=on_message))

    thread = threading.Thread(target=target)
    thread.start()
    return thread, results, printed


def test_a_cell_cannot_kill_the_kernel_or_a_host_process(fresh_kernel, sentinel):
    kernel = fresh_kernel()
    target = kernel_pid(kernel)
    _, text = run(
        kernel,
        "import os, signal\nhits = []\n"
        f"for pid in ({target}, {sentinel.pid}):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL); hits.append(pid)\n"
        "    except OSError as err:\n        print(pid, type(err).__name__)\n"
        "print('hits', hits)",
    )
    assert "hits []" in text
    assert kernel.km.is_alive()
    assert sentinel.alive_and_untraced()
    assert kernel.execute("1 + 1").result_text == "2"


def test_a_cell_cannot_ptrace_a_process_of_the_same_user(fresh_kernel, sentinel):
    kernel = fresh_kernel()
    _, text = run(
        kernel,
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"print('attach', libc.ptrace(16, {sentinel.pid}, 0, 0), ctypes.get_errno())\n"
        f"print('seize', libc.ptrace(0x4206, {sentinel.pid}, 0, 0), ctypes.get_errno())",
    )
    assert "attach -1" in text and "seize -1" in text
    assert sentinel.alive_and_untraced()


def test_a_cell_cannot_read_the_kernel_key_memory_or_connection_file(fresh_kernel):
    kernel = fresh_kernel()
    connection_file = kernel.km.connection_file
    key = json.loads(Path(connection_file).read_text())["key"]
    target = kernel_pid(kernel)
    _, text = run(
        kernel,
        "import os, glob\nfound = []\n"
        f"targets = ('/proc/{target}/mem', '/proc/{target}/cmdline', '/proc/{target}/environ', {connection_file!r})\n"
        "for path in targets:\n"
        "    try:\n        found.append(open(path, 'rb').read(65536))\n"
        "    except OSError as err:\n        print(path, type(err).__name__)\n"
        "for path in glob.glob('/proc/[0-9]*/cmdline'):\n"
        "    try:\n        found.append(open(path, 'rb').read(65536))\n"
        "    except OSError:\n        pass\n"
        f"for name in glob.glob({os.path.dirname(connection_file)!r} + '/*.json'):\n"
        "    try:\n        found.append(open(name, 'rb').read(65536))\n"
        "    except OSError:\n        pass\n"
        "blob = b'\\n'.join(found).decode(errors='replace')\n"
        "print([line.strip()[:200] for line in blob.splitlines() if '\"key\"' in line][:20])",
    )
    assert f"/proc/{target}/mem FileNotFoundError" in text
    assert f"{connection_file} FileNotFoundError" in text
    assert key not in text


def test_the_kernel_environment_does_not_reach_a_cell(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_TEST_API_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET})
    _, text = run(
        kernel,
        "import os, glob\nprint(dict(os.environ))\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n        print(open(path, 'rb').read())\n"
        "    except OSError:\n        pass\n"
        "import subprocess\nprint(subprocess.run(['env'], capture_output=True, text=True).stdout)",
    )
    assert SECRET not in text
    assert "HOME" in text  # the cell did print an environment


def test_a_passed_variable_reaches_a_cell_only_when_the_operator_names_it(fresh_kernel, tmp_path):
    (tmp_path / "capsule.toml").write_text('[sandbox]\npass_env = ["CAPSULE_TEST_VISIBLE"]\nenv = {GREETING = "hi"}\n')
    kernel = fresh_kernel(env={"CAPSULE_TEST_VISIBLE": "shown", "CAPSULE_TEST_HIDDEN": SECRET})
    result = kernel.execute(
        "import os\nos.environ.get('CAPSULE_TEST_VISIBLE'), os.environ.get('GREETING'), "
        "os.environ.get('CAPSULE_TEST_HIDDEN')"
    )
    assert result.result_text == "('shown', 'hi', None)"


def test_a_cell_is_not_host_root_and_holds_no_capability(fresh_kernel):
    kernel = fresh_kernel()
    pid = kernel.sandbox_pid()
    host_uid = status_field(pid, "Uid").split()[0]
    assert host_uid != "0"
    assert int(status_field(pid, "CapEff"), 16) == 0
    assert int(status_field(pid, "CapPrm"), 16) == 0
    assert status_field(pid, "NoNewPrivs") == "1"
    assert status_field(pid, "Seccomp") == "2"
    result = kernel.execute("import os\nos.unshare(os.CLONE_NEWUSER)")
    assert result.status == "error"  # no user namespaces, hence no capabilities, inside


@pytest.mark.skipif(platform.machine() != "x86_64", reason="system call numbers below are x86_64's")
def test_the_seccomp_filter_denies_kernel_and_process_inspection_calls(fresh_kernel):
    kernel = fresh_kernel()
    calls = {
        "ptrace": 101,
        "mount": 165,
        "init_module": 175,
        "kexec_load": 246,
        "keyctl": 250,
        "perf_event_open": 298,
        "bpf": 321,
        "userfaultfd": 323,
        "process_vm_readv": 310,
        "io_uring_setup": 425,
    }
    result = kernel.execute(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nout = {}\n"
        f"for name, number in {calls!r}.items():\n"
        "    ret = libc.syscall(number, 0, 0, 0, 0, 0)\n"
        "    out[name] = (ret, ctypes.get_errno())\n"
        "out"
    )
    outcome = eval(result.result_text)
    assert outcome == {name: (-1, 1) for name in calls}  # every one: EPERM


def test_a_cell_cannot_read_or_write_home_secrets(fresh_kernel, secret_home):
    kernel = fresh_kernel(env={"HOME": str(secret_home)})
    before = {path: digest(path) for path in (secret_home / ".bashrc", secret_home / ".ssh" / "id_ed25519")}
    _, text = run(
        kernel,
        f"home = {str(secret_home)!r}\n"
        "for name in ('.ssh/id_ed25519', '.bashrc'):\n"
        "    try:\n        print(open(home + '/' + name).read())\n"
        "    except OSError as err:\n        print(name, 'read', type(err).__name__)\n"
        "    try:\n        open(home + '/' + name, 'a').write('pwned')\n"
        "    except OSError as err:\n        print(name, 'write', type(err).__name__)",
    )
    assert SECRET not in text
    assert {path: digest(path) for path in before} == before


def test_home_dot_files_stay_hidden_when_the_notebook_lives_in_home(fresh_kernel, secret_home):
    notebooks = secret_home  # jupyter lab started in ~
    kernel = fresh_kernel(env={"HOME": str(secret_home)}, cwd=notebooks)
    (notebooks / "data.csv").write_text("a,b\n1,2\n")
    _, text = run(
        kernel,
        "import os\nprint(open('data.csv').read())\nprint(sorted(os.listdir('.')))\n"
        "try:\n    print(open('.ssh/id_ed25519').read())\n"
        "except OSError as err:\n    print('key', type(err).__name__)\n"
        "print(repr(open('.bashrc').read()))",
    )
    assert "a,b" in text  # the notebook's own files are there
    assert SECRET not in text


def test_a_cell_cannot_write_the_environment_the_store_or_another_notebook(fresh_kernel, tmp_path):
    home = tmp_path / "capsule-home"
    work = tmp_path / "notebook-a"
    other = tmp_path / "notebook-b"
    work.mkdir()
    other.mkdir()
    (other / "victim.ipynb").write_text("{}")
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)}, cwd=work)
    kernel.execute("x = 1")
    wait_until(lambda: (home / "capsule.sqlite").exists(), what="the store")
    planted = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    planted = planted / "site-packages" / "capsule_planted.py"
    planted.unlink(missing_ok=True)  # left by a run against an unconfined sandbox, if any
    victim_before = digest(other / "victim.ipynb")
    _, text = run(
        kernel,
        f"targets = [{str(planted)!r}, {str(other / 'victim.ipynb')!r}, {str(home / 'capsule.sqlite')!r},"
        f" {str(home / 'chunks' / 'planted')!r}]\n"
        "for path in targets:\n"
        "    try:\n        open(path, 'a').write('pwned')\n        print(path, 'WRITTEN')\n"
        "    except OSError as err:\n        print(path, type(err).__name__)",
    )
    assert "WRITTEN" not in text
    try:
        assert not planted.exists()
    finally:
        planted.unlink(missing_ok=True)
    assert not (home / "chunks" / "planted").exists()
    assert digest(other / "victim.ipynb") == victim_before


def test_a_cell_cannot_reach_a_host_unix_socket(fresh_kernel, tmp_path):
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    try:
        (tmp_path / "nb").mkdir()
        kernel = fresh_kernel(cwd=tmp_path / "nb")
        _, text = run(
            kernel,
            "import socket\ns = socket.socket(socket.AF_UNIX)\n"
            f"try:\n    s.connect({str(path)!r}); s.send(b'hello'); print('CONNECTED')\n"
            "except OSError as err:\n    print('refused', type(err).__name__)",
        )
        assert "CONNECTED" not in text
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


def test_code_planted_in_the_notebook_directory_runs_in_no_trusted_process(fresh_kernel, tmp_path):
    work = tmp_path / "nb"
    markers = tmp_path / "markers"
    work.mkdir()
    markers.mkdir()
    kernel = fresh_kernel(cwd=work)
    payload = f"import os\nopen(os.path.join({str(markers)!r}, __name__ + '-' + str(os.getpid())), 'w').close()\n"
    result = kernel.execute(
        "import os\n"
        f"payload = {payload!r}\n"
        "for name in ('json.py', 'sitecustomize.py', 'usercustomize.py', 'ipykernel_launcher.py', 'zmq.py'):\n"
        "    open(name, 'w').write(payload)\n"
        "os.makedirs('capsule_kernel', exist_ok=True)\n"
        "open('capsule_kernel/__init__.py', 'w').write(payload)\n"
        "open('capsule_kernel/__main__.py', 'w').write(payload)\n"
        "sorted(os.listdir('.'))"
    )
    assert "json.py" in result.result_text  # the files were planted
    assert kernel.execute("%capsule restart").status == "ok"
    assert kernel.execute("import json\n1").result_text == "1"
    kernel.km.restart_kernel(now=False)
    kernel.kc.wait_for_ready(timeout=60)
    assert kernel.execute("2").result_text == "2"
    assert kernel.execute("%capsule mode wasm").status == "ok"
    assert kernel.execute("3").result_text == "3"
    assert sorted(os.listdir(markers)) == []


def test_a_cell_cannot_lift_its_process_limit(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_PROCS": "40"})
    kernel.execute("1")
    groups = sandbox_cgroups(kernel, "pids")
    assert groups, "the sandbox has a pids cgroup"
    _, text = run(
        kernel,
        "import glob\n"
        "for path in glob.glob('/sys/fs/cgroup/**/pids.max', recursive=True) + ['/sys/fs/cgroup/pids/pids.max']:\n"
        "    try:\n        open(path, 'w').write('max'); print('LIFTED', path)\n"
        "    except OSError as err:\n        print(path, type(err).__name__)\n"
        "import os, time\nchildren = []\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n            time.sleep(30); os._exit(0)\n"
        "        children.append(pid)\n"
        "except OSError as err:\n    print('fork stopped', type(err).__name__)\n"
        "print('forked', len(children))\n"
        "for pid in children:\n    os.kill(pid, 9); os.waitpid(pid, 0)",
    )
    assert "LIFTED" not in text
    assert (groups[-1] / "pids.max").read_text().strip() == "40"
    forked = int(text.split("forked ")[1].split()[0])
    assert forked < 40


def _peak(kernel, controller_file: str) -> int:
    groups = sandbox_cgroups(kernel, "memory")
    return max(int((group / controller_file).read_text()) for group in groups)


def test_forked_children_together_stay_under_the_memory_limit(fresh_kernel):
    limit = 512 * 1024**2
    kernel = fresh_kernel(env={"CAPSULE_MEMORY": "512MiB"})
    kernel.execute("x = 'kept'")
    thread, results, _ = execute_in_background(
        kernel,
        "import os, select, time\nkids, pipes = [], []\n"
        "for _ in range(4):\n"
        "    read_end, write_end = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(200 * 1024 * 1024)\n"
        "        for i in range(0, len(block), 4096): block[i] = 1\n"
        "        os.write(write_end, b'+'); time.sleep(30); os._exit(0)\n"
        "    os.close(write_end)\n"
        "    kids.append(pid); pipes.append(read_end)\n"
        "# each child says when it holds its 200 MiB, or its pipe closes when it is killed\n"
        "holding = 0\n"
        "while pipes:\n"
        "    ready, _, _ = select.select(pipes, [], [], 60)\n"
        "    if not ready:\n        break\n"
        "    for fd in ready:\n"
        "        holding += os.read(fd, 1) == b'+'\n"
        "        pipes.remove(fd)\n"
        "alive = [os.waitpid(pid, os.WNOHANG)[0] == 0 for pid in kids]\n"
        "print('alive', sum(alive))\n"
        "for pid in kids:\n    try: os.kill(pid, 9)\n    except OSError: pass",
    )
    peaks = []
    while thread.is_alive():
        try:
            peaks.append(_peak(kernel, "memory.max_usage_in_bytes"))
        except (OSError, ValueError):
            pass  # a cgroup removed as its sandbox died
        thread.join(0.05)
    assert results
    assert peaks and max(peaks) <= limit + 8 * 1024**2
    assert kernel.km.is_alive()
    assert "alive 4" not in results[0].texts()  # they could not all hold their 200 MiB


def test_dev_shm_files_count_against_the_memory_limit(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MEMORY": "256MiB", "CAPSULE_DISK": "2GiB"})
    kernel.execute("before = 'kept'")
    result = kernel.execute(
        "chunk = b'x' * (16 * 1024 * 1024)\nwritten = 0\n"
        "with open('/dev/shm/big', 'wb') as f:\n"
        "    for _ in range(80):\n        f.write(chunk); f.flush(); written += len(chunk)\n"
        "print('wrote', written)",
        timeout=120,
    )
    text = result.texts()
    assert "wrote 1342177280" not in text
    assert "memory limit" in text
    assert kernel.km.is_alive()
    assert kernel.execute("before").result_text == "'kept'"  # restored from its checkpoint


def test_tmp_is_limited_by_the_disk_limit(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_DISK": "64MiB"})
    result = kernel.execute(
        "kept = 1\nimport errno\n"
        "try:\n"
        "    with open('/tmp/big', 'wb') as f:\n"
        "        for _ in range(10): f.write(b'x' * (10 * 1024 * 1024))\n"
        "except OSError as err:\n    print('stopped', errno.errorcode[err.errno])\n"
        "import os\nos.remove('/tmp/big')"
    )
    assert "stopped ENOSPC" in result.texts()
    assert kernel.execute("kept").result_text == "1"


def test_a_daemon_does_not_outlive_its_sandbox(fresh_kernel):
    tag = str(700000 + os.getpid() % 100000)
    kernel = fresh_kernel()
    kernel.execute(
        "import subprocess\n"
        f"subprocess.run(['setsid', 'sh', '-c', '(sleep {tag} &) ; exit'], check=True)\n"
        f"subprocess.run(['sh', '-c', 'nohup sleep {tag}1 >/dev/null 2>&1 &'], check=True)"
    )
    wait_until(lambda: len(processes_with(f"sleep {tag}")) >= 2, what="the daemons to start")
    assert kernel.execute("%capsule restart").status == "ok"
    assert wait_gone(f"sleep {tag}") == []
    # The old sandbox's cgroup goes too, once its last process has exited.
    wait_until(lambda: len(sandbox_cgroups(kernel, "pids")) == 1, what="one cgroup left")
    kernel.execute(f"import subprocess\nsubprocess.run(['setsid', 'sh', '-c', '(sleep {tag}2 &) ; exit'])")
    wait_until(lambda: processes_with(f"sleep {tag}2"), what="the daemon to start")
    kernel.close()
    assert wait_gone(f"sleep {tag}") == []


def test_the_stop_button_stops_a_cell_that_ignores_interrupts(fresh_kernel, tmp_path):
    (tmp_path / "capsule.toml").write_text('[sandbox]\ninterrupt_grace = "2s"\n')
    kernel = fresh_kernel()
    kernel.execute("kept = 'before'")
    thread, results, looping = execute_in_background(
        kernel,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('looping', flush=True)\nwhile True:\n    pass",
        started_when="looping",
    )
    assert looping.wait(60), "the cell never started its loop"
    kernel.km.interrupt_kernel()
    thread.join(60)
    assert results, "the cell never ended"
    result = results[0]
    assert result.status == "error"
    assert "did not stop within 2 s of the interrupt" in result.content["evalue"]
    assert kernel.execute("kept").result_text == "'before'"


def test_a_forged_snapshot_report_on_the_frame_pipe_ends_the_sandbox_not_the_kernel(fresh_kernel, tmp_path):
    home = tmp_path / "capsule-home"
    kernel = fresh_kernel(env={"CAPSULE_HOME": str(home)})
    kernel.execute("x = 1")
    # Its checkpoint lands first: a violation ends the sandbox at once, snapshots in flight included.
    assert kernel.execute("%capsule log -n 1").status == "ok"
    result = kernel.execute(
        "import json, os, struct, sys\n"
        "config = json.loads(open('/proc/self/cmdline').read().split('\\0')[-2])\n"
        "frame = json.dumps({'type': 'snapshot', 'execution_count': 99, 'entries': {'forged': "
        "{'type': 'int', 'repr': '1', 'digest': 'x', 'pickle': [], 'buffers': []}}, 'removed': []}).encode()\n"
        "os.write(config['write_fd'], struct.pack('>I', len(frame)) + frame)\n"
        "import time\nfor _ in range(100):\n    time.sleep(0.1)"
    )
    assert result.status == "error"
    assert "protocol" in result.content["evalue"]
    assert kernel.km.is_alive()
    assert "forged" not in kernel.execute("%capsule log").texts()
    assert kernel.execute("x").result_text == "1"


def test_everyday_work_still_works_inside_the_confined_sandbox(fresh_kernel, tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n3,4\n")
    kernel = fresh_kernel()
    result = kernel.execute(
        "import numpy as np, pandas as pd, matplotlib.pyplot as plt, subprocess, tqdm\n"
        "frame = pd.read_csv('data.csv')\n"
        "plt.plot(np.arange(3)); plt.savefig('plot.png')\n"
        "listing = !ls\n"
        "shell = subprocess.run(['sh', '-c', 'echo from-shell; id -u'], capture_output=True, text=True).stdout\n"
        "for _ in tqdm.tqdm(range(3)): pass\n"
        "print(int(frame.b.sum()), sorted(listing), shell.split()[0])"
    )
    assert result.status == "ok", result.texts()
    assert "6 ['data.csv', 'plot.png'] from-shell" in result.stdout
    bash = kernel.execute("%%bash\necho bash-$((1 + 1))")
    assert "bash-2" in bash.stdout
    assert (tmp_path / "plot.png").exists()  # the working directory is writable


def test_a_declared_mount_is_shown_and_nothing_beside_it(fresh_kernel, tmp_path):
    data = tmp_path / "data"
    beside = tmp_path / "beside"
    work = tmp_path / "nb"
    for directory in (data, beside, work):
        directory.mkdir()
    (data / "in.txt").write_text("mounted")
    (beside / "secret.txt").write_text(SECRET)
    kernel = fresh_kernel(cwd=work, env={"CAPSULE_NOTEBOOK_MAY_WIDEN": "mounts"})
    kernel.execute("kept = 'yes'")
    assert "restarted" in kernel.execute(f"%capsule mount {data} --rw").texts()
    result = kernel.execute(
        f"print(open({str(data / 'in.txt')!r}).read())\n"
        f"open({str(data / 'out.txt')!r}, 'w').write('from the sandbox')\n"
        f"try:\n    print(open({str(beside / 'secret.txt')!r}).read())\n"
        "except OSError as err:\n    print('beside', type(err).__name__)\n"
        "print(kept)"
    )
    assert "mounted" in result.stdout and "beside FileNotFoundError" in result.stdout
    assert "yes" in result.stdout  # the restart kept the namespace
    assert SECRET not in result.texts()
    assert (data / "out.txt").read_text() == "from the sandbox"


def test_a_config_file_written_by_a_cell_is_not_read_as_policy(fresh_kernel, tmp_path):
    work = tmp_path / "nb"
    work.mkdir()
    kernel = fresh_kernel(cwd=work, env={"CAPSULE_MEMORY": "768MiB"})
    wide = f'[limits]\nprocs = "unlimited"\nnetwork = "on"\n[fs_access]\nwrite = [{str(tmp_path)!r}]\n'
    result = kernel.execute(f"open('capsule.toml', 'w').write({wide!r})")
    assert "will not read it as configuration" in result.stderr
    kernel.km.restart_kernel(now=False)
    kernel.kc.wait_for_ready(timeout=60)
    limits = kernel.execute("%capsule limits").texts()
    procs = next(line for line in limits.splitlines() if line.startswith("procs"))
    network = next(line for line in limits.splitlines() if line.startswith("network"))
    assert "512" in procs and "off" in network, limits
    assert "(none)" in kernel.execute("%capsule mount").texts()


def test_cpu_burnt_by_a_child_process_counts_against_the_cell(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("kept = 'yes'")
    kernel.execute("%capsule limits --cpu 1s")
    result = kernel.execute(
        "import subprocess\nsubprocess.run(['sh', '-c', 'while :; do :; done'], timeout=60)", timeout=90
    )
    assert result.status == "error"
    assert "CPULimitExceeded" in result.texts() or "CPU limit" in result.texts()
    assert kernel.execute("kept").result_text == "'yes'"
