"""Units of the Wasm sandbox that need no kernel: runtime choice, fuel values, routing."""

from __future__ import annotations

import pytest

from capsule_kernel.kernel.analyzer import Analyzer
from capsule_kernel.kernel.router import REFUSED, route
from capsule_kernel.protocol.limits import LimitError, parse_fuel
from capsule_kernel.wasm_host.runtime import RuntimeUnavailable, cache_key, find_runtime


def test_default_runtime_is_the_pinned_package_data():
    runtime = find_runtime({})
    assert runtime.path.name == "python-3.12.0.wasm"
    assert runtime.sha256.startswith("e5dc5a39")


def test_runtime_is_pluggable(tmp_path):
    with pytest.raises(RuntimeUnavailable, match="no such file"):
        find_runtime({"CAPSULE_WASM_RUNTIME": str(tmp_path / "missing.wasm")})
    other = tmp_path / "python.wasm"
    other.write_bytes(b"\0asm\1\0\0\0")
    runtime = find_runtime({"CAPSULE_WASM_RUNTIME": str(other)})
    assert runtime.path == other
    assert cache_key(runtime) != cache_key(find_runtime({}))  # its own compiled artifact


@pytest.mark.parametrize(
    ("text", "value"),
    [("5000000", 5_000_000), ("5G", 5_000_000_000), ("2.5e9", 2_500_000_000), ("50M", 50_000_000), ("unlimited", None)],
)
def test_fuel_values(text, value):
    assert parse_fuel(text) == value


@pytest.mark.parametrize("text", ["lots", "5X", "-3", "0.0"])
def test_bad_fuel_values(text):
    with pytest.raises(LimitError):
        parse_fuel(text)


@pytest.mark.parametrize(
    ("code", "mode", "sandbox", "why"),
    [
        ("x = 1", "subprocess", "subprocess", "routing mode is subprocess"),
        ("x = 1", "wasm", "wasm", "routing mode is wasm"),
        ("import numpy", "wasm", REFUSED, "numpy"),
        ("!ls", "wasm", REFUSED, "shell"),
        ("%timeit 1", "wasm", REFUSED, "magics"),
        ("import ctypes", "wasm", REFUSED, "WASI build"),
        ("import json\njson.dumps(1)", "auto", "wasm", "pure Python"),
        ("from IPython.display import HTML", "auto", "wasm", "pure Python"),
        ("import pandas", "auto", "subprocess", "pandas"),
        ("import urllib.request", "auto", "subprocess", "network"),
        ("%capsule status\nx = 1", "auto", "wasm", "pure Python"),
    ],
)
def test_routing_table(code, mode, sandbox, why):
    decision = route(Analyzer().plan(code), mode)
    assert decision.sandbox == sandbox
    assert why in decision.reason


def test_auto_keeps_values_wasm_cannot_load_in_the_subprocess_sandbox():
    plan = Analyzer().plan("arr.sum()")
    assert route(plan, "auto", {"arr": "numpy.ndarray"}).sandbox == "subprocess"
    assert route(plan, "auto", {"arr": "collections.OrderedDict"}).sandbox == "wasm"
    assert route(plan, "auto", {"arr": "list"}).sandbox == "wasm"
