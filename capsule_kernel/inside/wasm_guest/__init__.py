"""UNTRUSTED, the Wasm guest (CPython for WASI in wasmtime): everything here is attacker-controlled.

Shipped into the guest with protocol/ and inside/ (wasm_host.library.guest_library); shims/ stands in for IPython.
"""
