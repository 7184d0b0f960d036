"""HTTP routes, each a validation, one engine call (`app.deps.EngineDep`) and a response model:
search.py (searches), embed.py (vectors), collections.py (collections and items), media.py (image
files and thumbnails), writes.py (uploads, deletes, captions, compaction), admin.py (reload),
ops.py (health, readiness, metrics), ui.py (the search page); common.py (what they share)."""
