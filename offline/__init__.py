"""Offline pipeline: dataset download/preparation, embedding, indexing, evaluation."""
