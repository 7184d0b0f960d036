"""Offline pipeline: dataset download/preparation, embedding, indexing, evaluation, hubness,
fine-tuning, and ingest/migrate of collections (both through `clipsearch.collection.Collection`)."""
