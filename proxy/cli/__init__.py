"""The `embedding-proxy` command line: serve (and its workers), keys, teams, usage, cache, checks."""
