"""The HTTP API (v1): routes, schemas, errors and dependencies."""
