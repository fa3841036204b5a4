"""TRUSTED, in the kernel process: %%capsule task and @task, exactly once per key, in fresh sandboxes."""
