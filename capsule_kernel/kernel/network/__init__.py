"""The network a sandbox may reach: the allowed-hosts proxy, in the kernel (trusted)."""
