"""IPython.display's everyday classes, for the Wasm sandbox.

Each one only carries data and offers it through the _repr_*_ methods the
guest's formatter reads, as IPython's own classes do.
"""

from __future__ import annotations

import json
from typing import Any


def _guest() -> Any:
    from capsule_kernel.inside.wasm_guest import guest as wasm_guest

    if wasm_guest.GUEST is None:
        raise RuntimeError("display() needs the Capsule Wasm sandbox")
    return wasm_guest.GUEST


def display(*objs: Any, **kwargs: Any) -> Any:
    return _guest().display(*objs, **kwargs)


def update_display(obj: Any, *, display_id: str, **kwargs: Any) -> None:
    _guest().display(obj, display_id=display_id, update=True, **kwargs)


def clear_output(wait: bool = False) -> None:
    _guest().clear_output(wait)


class DisplayObject:
    def __init__(self, data: Any = None, url: str | None = None, filename: str | None = None, metadata: Any = None):
        if filename is not None:
            with open(filename, "rb" if self._binary else "r") as handle:
                data = handle.read()
        self.data = data
        self.url = url
        self.metadata = metadata

    _binary = False

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} object>"


class HTML(DisplayObject):
    def _repr_html_(self) -> str:
        return str(self.data)


class Markdown(DisplayObject):
    def _repr_markdown_(self) -> str:
        return str(self.data)


class Latex(DisplayObject):
    def _repr_latex_(self) -> str:
        return str(self.data)


class SVG(DisplayObject):
    def _repr_svg_(self) -> str:
        return str(self.data)


class Pretty(DisplayObject):
    def __repr__(self) -> str:
        return str(self.data)


class JSON(DisplayObject):
    def _repr_json_(self) -> Any:
        return json.loads(self.data) if isinstance(self.data, str) else self.data


class Image(DisplayObject):
    _binary = True

    def __init__(
        self, data: Any = None, url: str | None = None, filename: str | None = None, format: str = "png", **kwargs: Any
    ) -> None:
        super().__init__(data, url, filename, kwargs.get("metadata"))
        self.format = "jpeg" if format in ("jpg", "jpeg") else "png"

    def _repr_png_(self) -> bytes | None:
        return self.data if self.format == "png" else None

    def _repr_jpeg_(self) -> bytes | None:
        return self.data if self.format == "jpeg" else None


class Javascript(DisplayObject):
    def _repr_mimebundle_(self) -> dict[str, Any]:
        return {"application/javascript": str(self.data)}


__all__ = [
    "HTML",
    "JSON",
    "SVG",
    "DisplayObject",
    "Image",
    "Javascript",
    "Latex",
    "Markdown",
    "Pretty",
    "clear_output",
    "display",
    "update_display",
]
