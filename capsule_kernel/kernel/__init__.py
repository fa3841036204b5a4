"""TRUSTED, the kernel process: the protocol face, the session, the sandbox clients, the store.

Holds the operator's policy, the checkpoint store and its key. Trusts nothing a sandbox sends; never
imports inside/ (tests/test_import_contract.py).
"""
