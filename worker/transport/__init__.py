"""Redis, the worker's side and the connections both sides share. Knows no backend."""
