"""UNTRUSTED: what runs INSIDE a sandbox. All of it is attacker-controlled; the kernel checks every frame it sends.

The modules at this level run in both sandboxes and are shipped into the Wasm guest
(``wasm_host.library.guest_library``): the stop exceptions a cell sees at a limit (``stops``),
stdout/stderr as stream frames (``streams``), the table that answers the kernel's requests
(``requests``), the ledger of what the last snapshot saved (``ledger``), pickling names
(``snapshot``) and the notebook's side of tasks (``tasks``). ``worker/`` is the subprocess
sandbox's worker, ``wasm_guest/`` the Wasm guest. Imports protocol/ and inside/ only.
"""
