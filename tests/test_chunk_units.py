"""Chunks and snapshot layouts without a kernel: hashing once, parallel reads, corruption."""

from __future__ import annotations

import os

import numpy as np
import pytest

from capsule_kernel.checkpoint import chunks, snapshot
from capsule_kernel.checkpoint.chunks import CHUNK_BYTES, ChunkError, HashingThreads
from capsule_kernel.checkpoint.store import CheckpointStore


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


def test_given_digests_are_not_recomputed_but_used_as_names(tmp_path):
    data = os.urandom(1000)
    names = chunks.piece_digests(data)
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
