"""Capsule: a Jupyter kernel that runs every cell in a sandbox."""

__version__ = "0.1.0"
