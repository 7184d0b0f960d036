"""HTTP routes: search.py (search and image files), ops.py (health, readiness, metrics)."""
