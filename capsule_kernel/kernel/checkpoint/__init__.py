"""Namespace checkpoints and durable promises.

snapshot.py and chunks.py run inside sandboxes (the subprocess worker and the
Wasm guest alike) and never import anything beyond the stdlib and
cloudpickle; store.py, recorder.py and promises.py run in the kernel, which
stores snapshot bytes without ever unpickling them.
"""
