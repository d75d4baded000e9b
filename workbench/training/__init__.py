"""Training the project's default byte-level models on the standard library's sources."""
