"""The USER'S process: capsule-kernel run, the papermill engine, the CLI (trusted like the user; drives a kernel)."""
