"""Tasks, as the notebook sees them: ``TaskFailed``, ``envelope(NAME)`` and the ``@task`` decorator.

    from capsule_kernel.tasks import task

    @task(timeout="30s", retries=2, memory="512MB", compute="medium", sandbox="wasm")
    def score(text): ...

    score("abc")               # runs isolated; the result, or TaskFailed (e.envelope)
    h = score.submit("abc")    # a handle: h.result(timeout=None), h.envelope, h.cancel(); awaitable
    score.map(["a", "b"])      # in parallel under the scheduler; results in order

The function and its arguments are pickled here (cloudpickle) and reach the
task's sandbox through the kernel as opaque base64; the kernel checks every
option against the operator's policy, as for ``%%capsule task``.

Runs INSIDE the notebook's sandbox (``from capsule_kernel.tasks import task``).
The kernel runs every task in a sandbox of its own and binds its result to
NAME here, between cells, through a ``bind`` request (``bind`` below): the
value as the task's sandbox pickled it, loaded under the same trust rules as
a checkpoint (a value made in the Wasm sandbox loads outside it as data
only), and the task's envelope, which ``envelope(NAME)`` returns.
"""

from __future__ import annotations

import base64
from typing import Any

# The sandbox's shell (the worker's SandboxShell or the Wasm guest's GuestShell), set at its start.
SHELL: Any = None
# The last envelope of each task this sandbox was told about (by the kernel's bind requests).
_ENVELOPES: dict[str, dict[str, Any]] = {}


class TaskFailed(Exception):
    """A task ended without success; ``envelope`` is its envelope (a dict)."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        error = envelope.get("error") or {}
        name = envelope.get("execution", {}).get("task_name", "?")
        super().__init__(f"task {name} failed ({error.get('type')}): {error.get('message')}")
        self.envelope = envelope


def envelope(name: str) -> dict[str, Any]:
    """The envelope of the last run of task ``name`` in this notebook (KeyError if it never ended here)."""
    if name not in _ENVELOPES:
        raise KeyError(f"no envelope of a task named {name!r} has reached this sandbox yet")
    return _ENVELOPES[name]


def bind(namespace: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """The kernel's ``bind`` request: keep the envelope, and on success set NAME to the task's value."""
    name = args["name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{name!r} is not a name")
    the_envelope = args.get("envelope")
    if isinstance(the_envelope, dict):
        _ENVELOPES[name] = the_envelope
    if not (isinstance(the_envelope, dict) and the_envelope.get("success")):
        return {"status": "ok", "bound": False}
    if isinstance(args.get("pickle"), str):
        from capsule_kernel.inside import snapshot

        entry = {"made_in": args["made_in"]} if args.get("made_in") else {}
        try:
            namespace[name] = snapshot.load_bytes(entry, base64.b64decode(args["pickle"]), [])
        except Exception as err:  # noqa: BLE001 - any failure to load it is reported
            # Refused (a Wasm-made value that is not data) or unloadable here: its JSON form, if it has one.
            if not the_envelope["execution"].get("result_json"):
                raise ValueError(snapshot.explain_failure(err)) from None
            namespace[name] = the_envelope["result"]
    elif args.get("json"):
        namespace[name] = the_envelope["result"]
    else:
        return {"status": "error", "ename": "ValueError", "evalue": "no value came with it", "traceback": []}
    return {"status": "ok", "bound": True}


# -- @task -------------------------------------------------------------------------------------


def _kernel(action: str, args: dict[str, Any]) -> dict[str, Any]:
    """One request to the kernel through this sandbox's channel (the worker's or the Wasm guest's shell)."""
    if SHELL is None:
        raise RuntimeError("@task runs only inside a Capsule kernel's sandbox")
    content = SHELL.capsule_task(action, args)
    if content.get("status") == "error":
        raise ValueError(f"@task: {content.get('error')}")
    return content


def _value(answer: dict[str, Any]) -> Any:
    envelope = answer["envelope"]
    if not envelope.get("success"):
        raise TaskFailed(envelope)
    if isinstance(answer.get("pickle"), str):
        from capsule_kernel.inside import snapshot

        entry = {"made_in": answer["made_in"]} if answer.get("made_in") else {}
        try:
            return snapshot.load_bytes(entry, base64.b64decode(answer["pickle"]), [])
        except Exception:
            if envelope["execution"].get("result_json"):
                return envelope["result"]
            raise
    if envelope["execution"].get("result_json"):
        return envelope["result"]
    raise ValueError(f"the result cannot be returned here: {answer.get('unbindable', 'no value came with it')}")


class TaskHandle:
    """A submitted @task call."""

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        self._answer: dict[str, Any] | None = None

    def _wait(self, timeout: float | None) -> dict[str, Any]:
        if self._answer is None:
            try:
                answer = _kernel("wait", {"key": self.key, "timeout": timeout})
            except KeyboardInterrupt:
                self.cancel()
                raise
            if answer.get("status") == "timeout":
                raise TimeoutError(f"task {self.name} did not end within {timeout} s")
            self._answer = answer
            _ENVELOPES[self.name] = answer["envelope"]
        return self._answer

    def result(self, timeout: float | None = None) -> Any:
        """Block until the task ends; its value, or TaskFailed."""
        return _value(self._wait(timeout))

    @property
    def envelope(self) -> dict[str, Any]:
        return self._wait(None)["envelope"]

    def cancel(self) -> bool:
        return bool(_kernel("cancel", {"key": self.key}).get("cancelled"))

    def __await__(self) -> Any:
        async def waiting() -> Any:
            return self.result()

        return waiting().__await__()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name} {self.key[:12]}>"


class TaskFunction:
    def __init__(self, function: Any, name: str, options: dict[str, Any]) -> None:
        self.function = function
        self.name = name
        self.options = {k: v for k, v in options.items() if v is not None}
        self.__doc__ = getattr(function, "__doc__", None)
        self.__wrapped__ = function

    def submit(self, *args: Any, **kwargs: Any) -> TaskHandle:
        import cloudpickle

        payload = base64.b64encode(cloudpickle.dumps((self.function, args, kwargs), protocol=5)).decode("ascii")
        answer = _kernel("submit", {"name": self.name, "payload": payload, "options": self.options})
        return TaskHandle(answer["name"], answer["key"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.submit(*args, **kwargs).result()

    def map(self, items: Any) -> list[Any]:
        """One task per item, run in parallel under the kernel's scheduler; the results in order."""
        handles = [self.submit(item) for item in items]
        return [handle.result() for handle in handles]


def task(
    function: Any = None,
    *,
    name: str | None = None,
    sandbox: str | None = None,
    timeout: str | float | None = None,
    memory: str | int | None = None,
    cpu: str | float | None = None,
    fuel: str | int | None = None,
    compute: str | None = None,
    retries: int | None = None,
    backoff: str | float | None = None,
    retry_on: str | list[str] | None = None,
    id: str | None = None,
    allowed_hosts: list[str] | str | None = None,
) -> Any:
    """Make a function run as a task: isolated in a sandbox of its own, limited, retried, durable."""
    options = {
        "sandbox": sandbox, "timeout": timeout, "memory": memory, "cpu": cpu, "fuel": fuel, "compute": compute,
        "retries": retries, "backoff": backoff, "id": id,
        "retry_on": ",".join(retry_on) if isinstance(retry_on, list | tuple) else retry_on,
        "allowed_hosts": ",".join(allowed_hosts) if isinstance(allowed_hosts, list | tuple) else allowed_hosts,
    }  # fmt: skip

    def decorate(fn: Any) -> TaskFunction:
        return TaskFunction(fn, name or fn.__name__, options)

    return decorate(function) if callable(function) else decorate
