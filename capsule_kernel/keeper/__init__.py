"""TRUSTED, the keeper process (python -I -S keeper/keeper.py): a sandbox's parent outside the sandbox; stdlib only."""
