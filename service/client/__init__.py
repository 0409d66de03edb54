"""The client side: the Python client, the runbell command, and its live progress view."""
