"""Chunks and snapshot layouts without a kernel: hashing once, parallel reads, corruption."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from capsule_kernel.inside import snapshot
from capsule_kernel.kernel.checkpoint.store import CheckpointStore
from capsule_kernel.protocol import chunks
from capsule_kernel.protocol.chunks import CHUNK_BYTES, ChunkError, HashingThreads


def test_bytes_round_trip_through_parallel_reads(tmp_path):
    data = os.urandom(CHUNK_BYTES * 2 + 12345)
    digests, written = chunks.write_bytes(tmp_path, data)
    assert len(digests) == 3 and written == len(data)
    with HashingThreads(2) as threads:
        assert bytes(chunks.read_bytes(tmp_path, digests, threads.map)) == data
    # Stored once: writing the same bytes again adds nothing.
    assert chunks.write_bytes(tmp_path, data) == (digests, 0)


def test_empty_bytes_round_trip(tmp_path):
    digests, _ = chunks.write_bytes(tmp_path, b"")
    assert bytes(chunks.read_bytes(tmp_path, digests)) == b""


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_middle_chunk_is_named(tmp_path, damage):
    data = os.urandom(CHUNK_BYTES * 3)
    digests, _ = chunks.write_bytes(tmp_path, data)
    path = chunks.chunk_path(tmp_path, digests[1])
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.unlink()
    with HashingThreads(2) as threads, pytest.raises(ChunkError, match=digests[1][:12]):
        chunks.read_bytes(tmp_path, digests, threads.map)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_chunk_of_a_mapped_buffer_is_named(tmp_path, damage):
    data = os.urandom(CHUNK_BYTES * 2 + 4096)
    digests, _ = chunks.write_bytes(tmp_path, data)
    path = chunks.chunk_path(tmp_path, digests[0])
    raw = bytearray(path.read_bytes())
    path.unlink()
    if damage == "flip":
        raw[-1] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[:-1])
    with pytest.raises(ChunkError, match=digests[0][:12]):
        chunks.map_bytes(tmp_path, digests)


def _mappings_of(path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(str(path) in line for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_a_large_buffer_is_restored_copy_on_write_from_its_chunks(tmp_path):
    array = np.random.default_rng(1).random(CHUNK_BYTES // 8 * 2 + 1000)  # two chunks and a bit
    namespace = {"array": array}
    entry = snapshot.take(namespace, ["array"], {}, tmp_path)["entries"]["array"]
    with HashingThreads(2) as threads:
        restored = snapshot.load(entry, tmp_path, threads.map)
    assert np.array_equal(restored, array)
    assert _mappings_of(tmp_path) == 3  # mapped, not read: one mapping per chunk
    # Writable, and a write changes the value only, never the stored chunk.
    restored[0] = -1.0
    assert restored[0] == -1.0
    assert np.array_equal(snapshot.load(entry, tmp_path), array)
    # Garbage collection may delete a chunk a value still maps; the value keeps its bytes.
    for digest in entry["buffers"][0]:
        chunks.chunk_path(tmp_path, digest).unlink()
    assert np.array_equal(restored[1:], array[1:])
    # The mapping goes with the value.
    del restored
    assert _mappings_of(tmp_path) == 0


def test_mapping_a_buffer_of_many_chunks_holds_one_file_open_at_a_time(tmp_path):
    # In a child process: small chunks stand in for a 10 GB array, under a tight open-file limit.
    script = f"""
import os, resource
from pathlib import Path
from capsule_kernel.protocol import chunks
chunks.CHUNK_BYTES = 65536
chunks.MAP_AT_LEAST = 0
data = os.urandom(65536 * 64 + 100)
digests, _ = chunks.write_bytes(Path({str(tmp_path)!r}), data)
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
view = chunks.map_bytes(Path({str(tmp_path)!r}), digests)
assert len(digests) == 65 and bytes(view) == data, "mismatch"
print("mapped")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "mapped", result.stderr


def test_small_and_empty_buffers_are_read_not_mapped(tmp_path):
    # An empty buffer (matplotlib figures hold some) is one empty chunk.
    namespace = {"small": np.arange(1000), "empty": np.zeros(0), "blank": bytearray()}
    for name in namespace:
        entry = snapshot.take(namespace, [name], {}, tmp_path)["entries"][name]
        assert bytes(snapshot.load(entry, tmp_path)) == bytes(namespace[name])
    assert chunks.map_bytes(tmp_path, [chunks.chunk_digest(piece) for piece in chunks.pieces(b"")]) == b""
    assert _mappings_of(tmp_path) == 0


def test_given_digests_are_not_recomputed_but_used_as_names(tmp_path):
    data = os.urandom(1000)
    names = [chunks.chunk_digest(piece) for piece in chunks.pieces(data)]
    assert chunks.write_bytes(tmp_path, data, names)[0] == names
    assert chunks.verify(tmp_path, names[0])


def test_layout_digest_changes_with_any_buffer_and_only_then():
    arrays = [np.arange(2_000_000, dtype=np.float64) + i for i in range(3)]
    data, buffers = snapshot.snapshot_value(arrays)
    digest, _, buffer_chunks = snapshot.chunk_layout(data, buffers)
    assert len(buffer_chunks) == 3 and all(len(c) == 2 for c in buffer_chunks)  # 16 MB each
    again = snapshot.chunk_layout(*snapshot.snapshot_value(arrays))
    assert again[0] == digest
    arrays[2][-1] += 1.0  # one byte range of one buffer, in place
    changed = snapshot.chunk_layout(*snapshot.snapshot_value(arrays))
    assert changed[0] != digest
    assert changed[2][:2] == buffer_chunks[:2] and changed[2][2][0] == buffer_chunks[2][0]
    assert changed[2][2][1] != buffer_chunks[2][1]


def test_snapshot_and_load_with_threads(tmp_path):
    namespace = {"arrays": [np.ones(3_000_000) * i for i in range(3)], "small": {"a": 1}}
    with HashingThreads(2) as threads:
        result = snapshot.take(namespace, ["arrays", "small"], {}, tmp_path, threads.map)
        entries = result["entries"]
        loaded = snapshot.load(entries["arrays"], tmp_path, threads.map)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, namespace["arrays"], strict=True))
    assert snapshot.load(entries["small"], tmp_path) == {"a": 1}
    # Unchanged values are left out next time.
    previous = {name: entry["digest"] for name, entry in entries.items()}
    assert snapshot.take(namespace, ["arrays", "small"], previous, tmp_path)["entries"] == {}


def test_threads_that_cannot_start_fall_back_to_the_calling_thread(monkeypatch):
    threads = HashingThreads(2)

    def refuse(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threads._pool, "map", refuse)
    assert threads.map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    threads.__exit__(None, None, None)


def test_store_verifies_a_chunk_file_once_and_again_when_it_is_replaced(tmp_path):
    store = CheckpointStore(tmp_path)
    digests, _ = chunks.write_bytes(store.chunks, os.urandom(5000))
    entries = {"x": {"pickle": digests, "buffers": []}}
    assert store.missing_chunks(entries) == []
    path = chunks.chunk_path(store.chunks, digests[0])
    # Replaced by a different (corrupt) file: checked again and found bad.
    path.unlink()
    path.write_bytes(b"not the content")
    assert store.missing_chunks(entries) == digests
    path.unlink()
    assert store.missing_chunks(entries) == digests
    store.close()


def _snapshot_round(namespace, known, tmp_path, candidates=()):
    """One planned snapshot like the worker's: returns (entries written, new known state)."""
    ids, digests, sizes = known
    plan = snapshot.changed_names(namespace, set(), ids, sizes, digests, list(candidates))
    if plan is None:
        return {}, known
    todo, removed, current, aliases = plan
    previous = {name: digests[name] for name in todo if name in digests}
    entries = snapshot.take(namespace, todo, previous, tmp_path, aliases=aliases)["entries"]
    digests = {**{n: d for n, d in digests.items() if n not in removed}}
    sizes = dict(sizes)
    for name, entry in entries.items():
        digests[name], sizes[name] = entry["digest"], entry["size"]
    return entries, (current, digests, sizes)


def test_a_name_bound_to_the_same_object_is_saved_as_an_alias(tmp_path):
    shared = np.ones(3_000_000)
    namespace = {"a": shared, "b": shared, "n": 1, "m": 1}
    entries, known = _snapshot_round(namespace, ({}, {}, {}), tmp_path)
    assert entries["b"]["alias"] == "a" and "pickle" not in entries["b"]
    assert "alias" not in entries["m"]  # numbers have no identity worth keeping
    restored: dict = {}
    names, failed = snapshot.load_all(entries, restored, lambda e: snapshot.load(e, tmp_path), merge=False)
    assert names == ["a", "n", "m", "b"] and failed == {}
    assert restored["a"] is restored["b"] and np.array_equal(restored["a"], shared)
    # Nothing changed: only the small values are looked at again; the alias is not.
    ids, digests, sizes = known
    assert snapshot.changed_names(namespace, set(), ids, sizes, digests, [])[0] == ["n", "m"]


def test_a_change_through_an_alias_saves_the_target_and_rebinding_breaks_the_alias(tmp_path):
    namespace = {"a": [1], "b": None}
    namespace["b"] = namespace["a"]
    _, known = _snapshot_round(namespace, ({}, {}, {}), tmp_path)
    # A large target the cell did not name: mutated through b.
    namespace["a"] = namespace["b"] = list(range(300_000))
    _, known = _snapshot_round(namespace, known, tmp_path)
    namespace["b"].append(-1)
    entries, known = _snapshot_round(namespace, known, tmp_path, candidates=["b"])
    assert "a" in entries and entries["a"]["size"] > snapshot.SMALL_VALUE_BYTES
    # a is rebound: b keeps the old object and is saved in full.
    namespace["a"] = [2]
    entries, known = _snapshot_round(namespace, known, tmp_path, candidates=["a"])
    assert "alias" not in entries["b"] and "pickle" in entries["b"]


def test_an_alias_whose_target_fails_says_why(tmp_path):
    entries = {
        "a": {"error": "TypeError: cannot pickle '_thread.lock' object", "digest": None},
        "b": {"alias": "a", "digest": "alias:a", "size": 0},
    }
    namespace: dict = {}
    names, failed = snapshot.load_all(entries, namespace, lambda e: snapshot.load(e, tmp_path), merge=False)
    assert names == [] and "same object as a" in failed["b"] and "cannot pickle" in failed["b"]


def test_a_snapshot_stores_each_chunk_once_as_it_hashes(tmp_path):
    """Equal pieces hashed on parallel threads are written once and counted once."""
    same = np.zeros(CHUNK_BYTES // 8 * 4)  # four equal chunks, one array
    other = np.arange(CHUNK_BYTES // 8, dtype=np.float64)
    namespace = {"same": same, "copy": same.copy(), "other": other}
    with HashingThreads(4) as threads:
        result = snapshot.take(namespace, list(namespace), {}, tmp_path, threads.map)
    stored = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert not [path for path in stored if path.name.endswith(".tmp")]
    chunk_sizes = {path.name: path.stat().st_size for path in stored}
    assert result["written"] == sum(chunk_sizes.values())
    assert len(set(result["entries"]["same"]["buffers"][0])) == 1  # one name for four equal chunks
    assert result["entries"]["same"]["buffers"] == result["entries"]["copy"]["buffers"]
    # Every chunk the entries name is on disk once take() has returned.
    named = {d for entry in result["entries"].values() for part in [entry["pickle"], *entry["buffers"]] for d in part}
    assert named == set(chunk_sizes)
    loaded = snapshot.load(result["entries"]["copy"], tmp_path)
    assert np.array_equal(loaded, same)


def test_known_fingerprints_name_large_chunks_without_sha256(tmp_path, monkeypatch):
    """The second snapshot of a mostly unchanged value hashes only its changed chunk with SHA-256."""
    pytest.importorskip("blake3", reason="blake3 is not installed: every chunk is named by SHA-256")
    arrays = [np.full(CHUNK_BYTES // 8, float(i)) for i in range(3)]
    first = snapshot.take({"arrays": arrays}, ["arrays"], {}, tmp_path)
    assert len(first["fingerprints"]) == 3  # one per large chunk; the small pickle has none
    sha256_calls = []
    real = chunks.chunk_digest
    monkeypatch.setattr(chunks, "chunk_digest", lambda piece: sha256_calls.append(len(piece)) or real(piece))
    arrays[1] = arrays[1] + 0.5  # new content, unlike any chunk stored before
    second = snapshot.take({"arrays": arrays}, ["arrays"], {}, tmp_path, known=first["fingerprints"])
    assert sha256_calls.count(CHUNK_BYTES) == 1  # the changed array's chunk; the others were known
    names = second["entries"]["arrays"]["buffers"]
    assert names == [[real(memoryview(a).cast("B"))] for a in arrays]  # still true SHA-256 names
    assert second["written"] == CHUNK_BYTES  # the pickle around the buffers is the same as before
    loaded = snapshot.load(second["entries"]["arrays"], tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, arrays, strict=True))


def test_without_blake3_every_chunk_is_named_by_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks, "_blake3", lambda: None)
    arrays = [np.full(CHUNK_BYTES // 8, 2.0)]
    result = snapshot.take({"arrays": arrays}, ["arrays"], {}, tmp_path, known={"stale": "0" * 64})
    assert result["fingerprints"] == {}
    assert result["entries"]["arrays"]["buffers"] == [[chunks.chunk_digest(memoryview(arrays[0]).cast("B"))]]


def test_the_worker_keeps_the_latest_fingerprints_only(monkeypatch):
    from capsule_kernel.inside.worker import snapshots as worker_snapshots

    monkeypatch.setattr(worker_snapshots, "MAX_FINGERPRINTS", 3)
    snapshots = worker_snapshots.Snapshotter(shell=None, channel=None, chunk_root=None, report_fd=None)
    for batch in ({"a": "1", "b": "2"}, {"c": "3", "a": "1"}, {"d": "4"}):
        assert snapshots._learn({"ok": True, "digests": {}, "removed": [], "fingerprints": batch}, pid=1)
    assert snapshots.fingerprints == {"c": "3", "a": "1", "d": "4"}  # "b" was the least recently seen
    assert not snapshots._learn({"ok": False}, pid=2)  # a failed snapshot teaches nothing
    assert list(snapshots.fingerprints) == ["c", "a", "d"]


def test_preload_imports_the_fingerprint_hash_before_any_fork():
    """Snapshot children inherit blake3 from the worker instead of importing it each time."""
    pytest.importorskip("blake3", reason="blake3 is not installed: there is nothing to preload")
    script = (
        "import sys\n"
        "from capsule_kernel.protocol import chunks\n"
        "assert 'blake3' not in sys.modules, 'imported too early'\n"
        "chunks.preload()\n"
        "assert 'blake3' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_snapshot_taken_in_the_worker_matches_one_taken_in_a_child(tmp_path):
    """The worker's own snapshots (a Budget) name the same chunks as a child's, for values it may pickle."""
    namespace = {"log": list(range(500)), "table": {"a": [1.5, "b"]}, "f": len, "nothing": None}
    plain = snapshot.take(namespace, list(namespace), {}, tmp_path / "a")["entries"]
    here = snapshot.take(namespace, list(namespace), {}, tmp_path / "b", budget=snapshot.Budget(64 * 1024))
    assert {k: v["digest"] for k, v in here["entries"].items()} == {k: v["digest"] for k, v in plain.items()}


def test_the_worker_leaves_large_values_and_notebook_objects_to_a_child(tmp_path):
    """Past the budget, or at a value whose pickling may run the notebook's code (a __reduce__): NotHere."""

    class Notebooks:
        def __reduce__(self):
            raise AssertionError("the worker ran the notebook's __reduce__")

    for value in (bytes(100_000), [Notebooks()], {"deep": {"x": Notebooks()}}):
        with pytest.raises(snapshot.NotHere):
            snapshot.take({"v": value}, ["v"], {}, tmp_path, budget=snapshot.Budget(64 * 1024))


def test_the_worker_pickles_plain_notebook_objects_itself(tmp_path):
    """A dataclass, a slotted class, a bound method: pickled by the interpreter alone, so in the worker."""
    import dataclasses

    @dataclasses.dataclass
    class Config:
        rate: float
        layers: list = dataclasses.field(default_factory=list)

    class Point:
        __slots__ = ("x",)

        def __init__(self) -> None:
            self.x = 1

        def norm(self) -> int:
            return self.x

    class Lazy:  # looks attributes up in code of its own: pickling it would call it
        def __getattr__(self, name):
            raise AttributeError(name)

    budget = 64 * 1024
    point = Point()
    for value in (Config(0.1, [3]), point, point.norm):
        snapshot.take({"v": value}, ["v"], {}, tmp_path, budget=snapshot.Budget(budget))
    with pytest.raises(snapshot.NotHere):
        snapshot.take({"v": [Config(0.1, [Lazy()])]}, ["v"], {}, tmp_path, budget=snapshot.Budget(budget))
