"""The code both sandboxes run inside (sandbox/inside/), tested on its own."""

from __future__ import annotations

import threading

from capsule_kernel.inside.ledger import SnapshotLedger, clear_for_replace
from capsule_kernel.inside.requests import RequestTable
from capsule_kernel.inside.stops import CellTimeout, CPULimitExceeded, cpu_stop, timeout_stop
from capsule_kernel.inside.streams import FrameStream


def test_stops_name_the_limit_and_are_not_exceptions_user_code_catches():
    stop = timeout_stop({"timeout": 1.0})
    assert isinstance(stop, CellTimeout) and not isinstance(stop, Exception)
    assert "wall-clock limit of 1 s (timeout)" in str(stop)
    assert "limit of the deadline" in str(timeout_stop({}))
    cpu = cpu_stop({"cpu": 90})
    assert isinstance(cpu, CPULimitExceeded) and "CPU limit of 90 s (cpu)" in str(cpu)


def test_the_request_table_answers_every_request_with_its_id():
    def boom(args):
        raise RuntimeError("no")

    table = RequestTable({"echo": lambda args: {"status": "ok", **args}, "boom": boom})
    assert table.answer({"id": 3, "kind": "echo", "args": {"x": 1}}) == {
        "type": "reply",
        "id": 3,
        "content": {"status": "ok", "x": 1},
    }
    failed = table.answer({"id": 4, "kind": "boom"})
    assert failed["id"] == 4 and failed["content"]["ename"] == "RuntimeError"
    unknown = table.answer({"id": 5, "kind": "__class__"})
    assert unknown["content"]["status"] == "error" and "unknown request" in unknown["content"]["evalue"]
    assert table.answer({"id": 6, "kind": ["echo"]})["content"]["status"] == "error"


def test_a_frame_stream_keeps_order_and_bounds_its_buffer():
    sent: list[dict] = []
    stream = FrameStream("stdout", sent.append, threading.RLock())
    stream.write("a")
    stream.write("b\n")
    assert sent == []  # buffered until a flush (the sandbox decides when)
    stream.flush()
    assert sent == [{"type": "stream", "name": "stdout", "text": "ab\n"}]
    stream.write("x" * FrameStream.MAX_BUFFERED_CHARS)
    assert len(sent) == 2 and len(sent[1]["text"]) == FrameStream.MAX_BUFFERED_CHARS
    stream.flush()
    assert len(sent) == 2  # nothing left to send
    try:
        stream.write(b"bytes")  # type: ignore[arg-type]
    except TypeError as err:
        assert "must be str" in str(err)
    else:
        raise AssertionError("bytes were accepted")


def test_the_ledger_learns_forgets_and_follows_a_restore():
    ledger = SnapshotLedger()
    ledger.learn({"a": ("d1", 10), "b": (None, 0)}, removed=[])
    assert ledger.digests == {"a": "d1"} and ledger.sizes == {"a": 10}
    ledger.learn({}, removed=["a"])
    assert ledger.digests == {} and ledger.sizes == {}
    namespace = {"x": [1], "y": 2, "z": 3}
    entries = {"x": {"digest": "dx", "size": 5}, "y": {"module": "os"}}
    clear_for_replace(namespace, ["x", "y", "z"], entries)
    assert set(namespace) == {"x", "y"}
    ledger.restored(entries, ["x", "y"], namespace, replace=True)
    assert ledger.digests == {"x": "dx"} and ledger.sizes == {"x": 5}
    assert ledger.ids == {"x": id(namespace["x"]), "y": id(namespace["y"])}  # a deletion of y is reported later
    ledger.restored({"w": {"digest": "dw"}}, ["w"], {"w": 1}, replace=False)
    assert set(ledger.digests) == {"x", "w"}
    ledger.forget()
    assert not ledger.digests and not ledger.ids and not ledger.sizes


def test_a_cell_calling_a_notebook_function_may_change_the_globals_it_names():
    from capsule_kernel.inside.snapshot import names_changed_by

    namespace: dict = {}
    exec(
        "big = []\nother = {}\nuntouched = [1]\n"
        "def helper():\n    other['k'] = 1\n"
        "def grow():\n    big.append(1)\n    helper()\n"
        "class Box:\n    def fill(self):\n        untouched.append(2)\n"
        "box = Box()",
        namespace,
    )
    assert names_changed_by(namespace, ["grow"], []) == ["big", "grow", "helper", "other"]
    assert "untouched" in names_changed_by(namespace, ["box"], [])
    assert names_changed_by(namespace, ["untouched"], []) == ["untouched"]
    # A cell that reaches the namespace by globals() or exec may change any name.
    assert set(names_changed_by(namespace, ["globals"], [])) >= {"big", "other", "untouched", "box"}


def test_a_peeked_at_value_is_skipped_only_when_plain_and_the_builtin_is_not_shadowed():
    from capsule_kernel.inside.snapshot import names_changed_by

    class Sneaky(list):
        def __len__(self):
            self.append(1)
            return 0

    namespace = {"table": {"a": 1}, "sneaky": Sneaky()}
    assert names_changed_by(namespace, ["table", "sneaky"], ["table", "sneaky"]) == ["sneaky"]
    namespace["len"] = lambda value: 0  # a notebook's own len(): a peek is no longer a peek
    assert "table" in names_changed_by(namespace, ["table", "sneaky"], ["table", "sneaky"])
