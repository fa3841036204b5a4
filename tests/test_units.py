"""Pure functions: limit parsing and layering, frame decoding, the analyzer."""

from __future__ import annotations

import os

import pytest

from capsule_kernel.kernel.analyzer import Analyzer
from capsule_kernel.kernel.limit_settings import LimitSettings
from capsule_kernel.kernel.magics import MagicUsageError, capsule_lines
from capsule_kernel.protocol import frames
from capsule_kernel.protocol.deaths import describe_exit
from capsule_kernel.protocol.limits import (
    LimitError,
    Limits,
    format_duration,
    format_size,
    parse_count,
    parse_duration,
    parse_size,
    parse_switch,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512_000_000),
        ("1GiB", 1024**3),
        ("256k", 256 * 1024),
        ("1.5g", int(1.5 * 1024**3)),
        ("4096", 4096),
        ("unlimited", None),
        (2048, 2048),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("12", 12.0), ("none", None)]
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-5MB", "", "MB"])
def test_bad_sizes_are_rejected_with_examples(bad):
    with pytest.raises(LimitError, match="examples"):
        parse_size(bad)


def test_counts_and_switches():
    assert parse_count("64") == 64
    assert parse_count("unlimited") is None
    with pytest.raises(LimitError):
        parse_count("many")
    assert parse_switch("on") is True and parse_switch("off") is False
    with pytest.raises(LimitError):
        parse_switch("maybe")


def test_formatting():
    assert format_size(512 * 1024**2) == "512 MiB"
    assert format_size(None) == "unlimited"
    assert format_duration(0.5) == "500 ms"
    assert format_duration(90) == "90 s"
    assert format_duration(300) == "5 min"
    assert format_duration(7200) == "2 h"


def test_layering_file_then_env_then_override(tmp_path):
    (tmp_path / "capsule.toml").write_text('[limits]\nmemory = "2GiB"\ntimeout = "1m"\n')
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    settings = LimitSettings.load(cwd=nested, environ={"CAPSULE_TIMEOUT": "30s"})
    assert settings.limits.memory == 2 * 1024**3
    assert settings.sources["memory"].startswith("capsule.toml")
    assert settings.limits.timeout == 30.0
    assert settings.sources["timeout"] == "environment CAPSULE_TIMEOUT"
    settings.override({"timeout": "5s"}, "%capsule limits")
    assert settings.limits.timeout == 5.0 and settings.sources["timeout"] == "%capsule limits"


def test_override_is_all_or_nothing():
    settings = LimitSettings.load(cwd=Path_root(), environ={})
    before = settings.limits
    with pytest.raises(LimitError):
        settings.override({"memory": "1GiB", "cpu": "forever"}, "%capsule limits")
    assert settings.limits == before


def Path_root():
    from pathlib import Path

    return Path(os.sep)


def test_bad_config_values_warn_and_keep_going(tmp_path):
    (tmp_path / "capsule.toml").write_text('[limits]\nmemory = "huge"\nwidgets = 3\n')
    settings = LimitSettings.load(cwd=tmp_path, environ={"CAPSULE_FILES": "x"})
    assert len(settings.warnings) == 3
    assert settings.sources["memory"] == "default"


def test_broken_toml_is_a_warning_not_a_crash(tmp_path):
    (tmp_path / "capsule.toml").write_text("[limits\n")
    settings = LimitSettings.load(cwd=tmp_path, environ={})
    assert settings.warnings and "cannot read" in settings.warnings[0]


def test_limits_json_round_trip():
    limits = Limits(memory=1, cpu=2.0, timeout=3.0, files=4, procs=5, network=True)
    assert Limits.from_json(limits.to_json()) == limits


def test_frame_decoder_handles_split_and_glued_frames():
    data = frames.encode({"type": "a", "n": 1}) + frames.encode({"type": "b", "text": "é" * 1000})
    decoder = frames.FrameDecoder()
    seen = []
    for i in range(0, len(data), 7):
        seen += decoder.feed(data[i : i + 7])
    assert [m["type"] for m in seen] == ["a", "b"]
    assert decoder.pending_bytes == 0


def test_frame_decoder_rejects_garbage():
    with pytest.raises(frames.ProtocolError):
        frames.FrameDecoder().feed(b"\xff\xff\xff\xff" + b"x" * 10)
    with pytest.raises(frames.ProtocolError):
        frames.FrameDecoder().feed(frames.HEADER.pack(2) + b"[]")


def test_buffers_round_trip():
    assert frames.unpack_buffers(frames.pack_buffers([b"\x00\x01", memoryview(b"xy")])) == [b"\x00\x01", b"xy"]


def test_pipe_round_trip():
    read_fd, write_fd = os.pipe()
    frames.write_frame(write_fd, {"type": "ping"})
    os.close(write_fd)
    assert frames.read_frame(read_fd) == {"type": "ping"}
    assert frames.read_frame(read_fd) is None


analyzer = Analyzer()


def test_analyzer_names_and_modes():
    plan = analyzer.plan(
        "import numpy as np\nfrom os import path\nx = np.zeros(3)\ny = x + offset\ndel old\nitems.append(1)"
    )
    assert plan.imports == {"numpy", "os"}
    assert {"np", "path", "x", "y"} <= plan.writes
    assert {"offset", "items"} <= plan.reads
    assert "x" not in plan.reads
    assert plan.deletes == {"old"}
    assert plan.mutates == {"items"}
    assert plan.mode == "sync"


def test_analyzer_scopes():
    plan = analyzer.plan("def f(a):\n    b = a + g\n    return b\nclass C:\n    z = 1\nsquares = [i * i for i in data]")
    assert plan.writes == {"f", "C", "squares"}
    assert plan.reads == {"g", "data"}


def test_analyzer_global_statement_writes():
    plan = analyzer.plan("def bump():\n    global counter\n    counter += 1")
    assert "counter" in plan.writes


def test_analyzer_modes():
    assert analyzer.plan("await thing()").mode == "top-level-await"
    assert analyzer.plan("async with x:\n    pass").mode == "top-level-await"
    assert analyzer.plan("async def f():\n    await g()").mode == "async-def"


def test_analyzer_magics_shell_and_blocking_calls():
    plan = analyzer.plan(
        "%matplotlib inline\n!ls\nimport time as t, subprocess\nt.sleep(1)\nsubprocess.run(['x'])\nrequests.get(url)"
    )
    assert plan.magics == ("%matplotlib",)
    assert plan.uses_shell
    assert "time.sleep (sleep)" in plan.blocking_calls
    assert "subprocess.run (subprocess)" in plan.blocking_calls
    assert "requests.get (network)" in plan.blocking_calls
    assert analyzer.plan("%%timeit\nx = 1").magics == ("%%timeit",)


def test_analyzer_syntax_error_and_cache():
    plan = analyzer.plan("def (:")
    assert plan.syntax_error and "SyntaxError" in plan.syntax_error
    assert analyzer.plan("a = 1") is analyzer.plan("a = 1")


def test_capsule_lines():
    assert capsule_lines("%capsule status") == ["status"]
    assert capsule_lines("# comment\n%capsule limits --cpu 1s\n\n%capsule status") == ["limits --cpu 1s", "status"]
    assert capsule_lines("%capsule status\nx = 1") is None
    assert capsule_lines("%%capsule status") == ["status"]
    with pytest.raises(MagicUsageError):
        capsule_lines("%%capsule status\nprint(1)")


def test_describe_exit():
    limits = Limits(memory=1024**3)
    assert "exited with code 3" in describe_exit(3, limits)
    assert "SIGSEGV" in describe_exit(-11, limits) and "1 GiB" in describe_exit(-11, limits)
    assert "out-of-memory killer" in describe_exit(-9, limits)
    assert "SIGUSR1" in describe_exit(-10, limits)


def test_the_analyzer_tells_peeks_from_uses_that_may_change_a_value():
    from capsule_kernel.kernel.analyzer import Analyzer

    plan = Analyzer().plan
    assert plan("x = len(table) + len(log)").peeks == {"table", "log"}
    assert plan("total = float(array[:1000].sum())\nn = array.shape[0]").peeks == {"array"}
    # A piece handed out, a method that may change it, a store into it: not peeks.
    for code in ("v = array[:5]", "row = table[3]", "table.keys()", "log.append(len(log))", "array.fill(0)"):
        assert not plan(code).peeks - {"log"} or code.startswith("log"), code
    assert plan("log.append(len(log))").peeks == frozenset()
    assert plan("table[len(log)]['score'] += 1").peeks == {"log"}
    for code in ("globals()['x'] = 1", "exec('x = 1')", "%time x = 1", "!ls"):
        assert plan(code).opaque, code
    assert not plan("x = 1").opaque
