"""Per-channel activation statistics (measured on data) and goal statistics (recorded or read)."""
