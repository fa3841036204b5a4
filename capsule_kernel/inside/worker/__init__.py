"""UNTRUSTED, the subprocess sandbox's worker (real CPython under bubblewrap): everything here is attacker-controlled.

Imports protocol/ and inside/ only; the kernel never imports this package.
"""
