"""Tracebacks and inspection use the colours stock ipykernel uses, not a dark-terminal scheme.

A differential test: the same error and the same `?` through a capsule kernel
and the stock `python3` kernel must use the same terminal colour codes
(IPython's "neutral" scheme, readable on JupyterLab's light and dark themes).
"""

from __future__ import annotations

import re

from tests.harness import start_kernel

_SGR = re.compile(r"\x1b\[([0-9;]*)m")
ERROR_CELL = "def divide(a, b):\n    return a / b\n\ndivide(1, 0)"
# The highlight of the failing expression: black on yellow, and a grey on the spaces around names.
HIGHLIGHT = {"30;43", "39;49", "38;5;250"}


def _colours(text: str) -> set[str]:
    return set(_SGR.findall(text))


def _traceback_and_help(kernel_name: str, tmp_path) -> tuple[set[str], set[str]]:
    kernel = start_kernel(kernel_name, cwd=tmp_path)
    try:
        error = kernel.execute(ERROR_CELL).error
        assert error is not None and error["ename"] == "ZeroDivisionError"
        helped = kernel.request("inspect", "len(", 4, detail_level=0)["content"]
        return _colours("\n".join(error["traceback"])), _colours(helped["data"]["text/plain"])
    finally:
        kernel.close()


def test_tracebacks_and_signatures_are_coloured_as_in_stock_ipykernel(tmp_path):
    capsule = _traceback_and_help("capsule", tmp_path)
    stock = _traceback_and_help("python3", tmp_path)
    assert capsule[1] == stock[1], (capsule, stock)  # ? and Shift+Tab: the same codes
    # The traceback: stock's codes (its scheme's keyword colour among them), plus only IPython's
    # highlight of the failing expression, black on yellow, which reads on light and dark pages alike
    # (stock ipykernel compiles cells so that IPython cannot locate the expression, and shows none).
    assert "38;5;28;01" in capsule[0] and "38;5;28;01" in stock[0]
    assert capsule[0] - stock[0] <= HIGHLIGHT, (capsule, stock)
    # The dark-terminal scheme's bright white and light grey text would not show on a white page.
    assert not {"97", "37", "1;37", "01;37"} & capsule[0]
