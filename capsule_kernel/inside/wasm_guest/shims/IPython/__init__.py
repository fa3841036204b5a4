"""A stand-in for IPython inside the Wasm sandbox (the real one is not there)."""

from IPython.display import display


def get_ipython():  # noqa: ANN201 - mirrors IPython's signature
    from capsule_kernel.inside.wasm_guest import guest as wasm_guest

    return wasm_guest.GUEST.shell if wasm_guest.GUEST else None


__all__ = ["display", "get_ipython"]
