"""kdistill's service side: HTTP API, persistence, settings and the command line."""
