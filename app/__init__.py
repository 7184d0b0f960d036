"""The online half: a FastAPI service over the served collections: searches (text, image, more like
this, a query vector, weighted terms; images or captions as the target), embeddings, the items and
their media, and (with a write token) uploads, deletes, caption replacement and compaction.

A request runs route (`app/routes/`: validation, one engine call, response model) → engine
(`app/engine.py`, no HTTP: batching, cache, writes) → collection (`clipsearch.collection`, the one
write path) → store (`clipsearch.store.VectorStore`). Build it with
`app.main.create_app(settings, resources)`; `uvicorn app.main:app` serves the default. It imports
the shared core (`clipsearch`) and never the offline pipeline.
"""
