"""Both sides, stdlib only: the frames, limits, chunk format and exit wording that kernel and sandboxes share.

Imports nothing of Capsule outside protocol/; shipped byte for byte into the Wasm guest, so one
definition serves the kernel, the worker, the Wasm host and the guest.
"""
