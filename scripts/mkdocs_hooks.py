"""MkDocs hook (mkdocs.yml `hooks:`): the reference pages, generated from the code at every build.

docs/reference/http.md (the service's OpenAPI schema) and docs/reference/cli.md (the argparse parsers)
are added to the site as generated files, so they never lag the code and are never committed;
`python scripts/gen_docs.py` writes the same pages to disk for reading without the site.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File, Files


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", Path(__file__).with_name("gen_docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config) -> Files:
    for src_uri, text in _gen_docs().pages().items():
        existing = files.get_file_from_path(src_uri)
        if existing is not None:  # a copy written by gen_docs.py: the fresh one wins
            files.remove(existing)
        files.append(File.generated(config, src_uri, content=text))
    return files
