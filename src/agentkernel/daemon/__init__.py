"""The daemon: one per user, owns every sandbox, keeps warm pools, serves the CLI and API."""
