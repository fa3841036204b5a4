"""TRUSTED, in the kernel process: the clients of the sandboxes (spawn, confine, limit, talk frames, reap)."""
