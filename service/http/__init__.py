"""The HTTP API: the app and its server, auth, errors, the API contract, and the endpoints by area."""
