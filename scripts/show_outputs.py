"""Print an executed notebook's cells and outputs as plain text (used by ./dev tour)."""

from __future__ import annotations

import re
import sys

import nbformat

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def render(path: str) -> str:
    nb = nbformat.read(path, as_version=4)
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
                data = output.get("data", {})
                if "image/png" in data:
                    text = f"<image/png, {len(data['image/png'])} base64 characters>"
                elif "application/vnd.jupyter.widget-view+json" in data:
                    text = f"<widget {data['application/vnd.jupyter.widget-view+json']['model_id'][:8]}...>"
                else:
                    text = data.get("text/plain", "<" + ", ".join(data) + ">")
            label = "Out" if kind == "execute_result" else kind
            lines += [f"  {label}:", *("    " + line for line in _ANSI.sub("", text).rstrip("\n").splitlines())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1]))
