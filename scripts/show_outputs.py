"""Print an executed notebook's cells and outputs as plain text (used by ./dev tour)."""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser

import nbformat

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Text(HTMLParser):
    """The text of an HTML fragment, as a terminal reader wants it: tags dropped, cells split by " | "."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:  # noqa: ARG002
        if tag in ("td", "th") and self.parts and not self.parts[-1].endswith("\n"):
            self.parts.append(" | ")
        elif tag in ("tr", "br", "p", "div", "li"):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.parts.append(data.strip())


def html_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return "\n".join(line.strip(" |") for line in "".join(parser.parts).splitlines() if line.strip(" |"))


def widget_text(view: dict, states: dict) -> str:
    """A widget as its saved state describes it (nbclient stores the state in the notebook)."""
    model = view.get("model_id", "")
    state = states.get(model, {}).get("state", {})
    if not state:
        return f"<widget {model[:8]}...>"
    name = state.get("_model_name", "Widget").removesuffix("Model")
    children = [child.removeprefix("IPY_MODEL_") for child in state.get("children", []) if isinstance(child, str)]
    if children:  # a box (a tqdm bar is one): its children in a row
        return " ".join(widget_text({"model_id": child}, states) for child in children)
    if name == "HTML":
        return html_text(state.get("value", ""))
    keys = ("description", "value", "min", "max")
    shown = [f"{key}={state[key]!r}" for key in keys if state.get(key) not in (None, "")]
    return f"<{name} widget: {', '.join(shown)}>" if shown else f"<{name} widget>"


def data_text(data: dict, states: dict) -> str:
    """The most readable form of a display bundle on a terminal."""
    if "application/vnd.jupyter.widget-view+json" in data:
        return widget_text(data["application/vnd.jupyter.widget-view+json"], states)
    if "image/png" in data:
        return f"<image/png, {len(data['image/png'])} base64 characters>"
    if "text/markdown" in data:
        return data["text/markdown"]
    plain = data.get("text/plain")
    if "text/html" in data and (plain is None or plain.startswith("<IPython.core.display")):
        return html_text(data["text/html"])
    return plain if plain is not None else "<" + ", ".join(data) + ">"


def render(path: str) -> str:
    nb = nbformat.read(path, as_version=4)
    states = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    lines: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines += ["", *("# " + line for line in cell.source.splitlines()[:1])]
            continue
        if cell.cell_type != "code":
            continue
        lines += [
            "",
            f"In [{cell.get('execution_count') or ' '}]:",
            *("    " + line for line in cell.source.splitlines()),
        ]
        for output in cell.get("outputs", []):
            kind = output["output_type"]
            if kind == "stream":
                text = output["text"]
            elif kind == "error":
                text = f"{output['ename']}: {output['evalue']}"
            else:
                text = data_text(output.get("data", {}), states)
            label = "Out" if kind == "execute_result" else kind
            lines += [f"  {label}:", *("    " + line for line in _ANSI.sub("", text).rstrip("\n").splitlines())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1]))
