"""What runs INSIDE both sandboxes: shared by the subprocess worker and the Wasm guest.

Stdlib only, and shipped into the Wasm guest (``wasm_host.guest_library``),
so one definition serves both: the stop exceptions a cell sees at a limit
(``stops``), the stdout/stderr that become stream frames (``streams``), the
table that answers the kernel's requests (``requests``) and the ledger of
what the last snapshot saved (``ledger``). Framing is ``sandbox/frames.py``,
which the kernel side shares too. Nothing here is trusted by the kernel: it
checks every frame these modules produce.
"""
