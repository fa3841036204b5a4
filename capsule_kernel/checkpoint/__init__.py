"""Namespace checkpoints and durable promises (not built yet).

This package is where snapshots, the durable store and time travel will live
(see the checkpoint issue). Until then a sandbox death loses the namespace and
the kernel says so plainly in the cell's error.
"""
