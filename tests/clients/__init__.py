"""Client tests: the Python library and CLI, the Node.js client, each against a live server."""
