"""A notebook's session behind the kernel's protocol face (controller.py is the entry)."""
