"""TRUSTED, the Wasm host process (python -m capsule_kernel.wasm_host.host): wasmtime, fuel, memory, time.

Its own process, started by the kernel; it treats every guest frame and pickle as hostile bytes and
never unpickles. Imports protocol/ only, so the kernel may import runtime.py from here.
"""
