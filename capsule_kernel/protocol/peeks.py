"""What counts as only looking at a value: the analyzer finds such uses, the worker trusts them.

Both sides read the same tables: the kernel's analyzer marks a name a *peek*
when every use of it in a cell is one of these (len(x), x.shape, x.sum(),
x[i:j].mean()); the worker then skips re-hashing it for the cell's checkpoint,
but only when the value's type is plain (PLAIN_TYPES, or a numpy array) and
none of PEEK_CALLS is shadowed by a notebook name.
"""

from __future__ import annotations

# Calls that only look at their argument.
PEEK_CALLS = frozenset({"len", "isinstance", "type", "id", "print", "repr", "str", "bool", "hash"})
# Attributes of arrays that are metadata, and methods of arrays and numbers that return a new number.
PEEK_ATTRIBUTES = frozenset({"shape", "dtype", "size", "ndim", "nbytes"})
PEEK_METHODS = frozenset({"sum", "mean", "std", "var", "min", "max", "prod", "any", "all", "argmax", "argmin", "item"})
# Names through which code reaches the namespace without naming what it changes: a cell
# (the analyzer's `opaque`) or notebook function that uses one may change any name.
OPAQUE_NAMES = frozenset({"globals", "vars", "locals", "exec", "eval", "get_ipython", "__import__"})
# The candidate the kernel sends for an opaque cell: every name is looked at.
EVERY_NAME = "globals"
# Types whose peeks above cannot change them (exact types: a subclass may override anything).
PLAIN_TYPES = (list, tuple, dict, set, frozenset, str, bytes, int, float, complex, bool, type(None))
