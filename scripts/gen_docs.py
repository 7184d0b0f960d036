"""Write the generated reference pages of the docs site from the code itself:

- docs/reference/http.md from the service's OpenAPI schema (`app.main.create_app().openapi()`, with the
  write and admin routes switched on so that every route is listed);
- docs/reference/cli.md from the `clipsearch` command's argparse parsers (every subcommand's --help).

    python scripts/gen_docs.py            # write them to docs/reference/ (git-ignored), to read without the site

`mkdocs build` and `mkdocs serve` make the same pages at every build (scripts/mkdocs_hooks.py), so the
site never lags the code.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("get", "post", "put", "delete", "patch")


def _openapi() -> dict[str, Any]:
    from app.config import Settings
    from app.main import create_app

    # placeholder tokens only switch the write and admin routes on for the schema; nothing is served
    settings = Settings(artifacts_dir=REPO / "artifacts", write_token="x" * 32, admin_token="y" * 32)
    return create_app(settings).openapi()


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return f"list of {_schema_name(schema['items'])}"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_schema_name(s) for s in schema[key])
    return schema.get("type", "object")


def _cell(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def http_page(spec: dict[str, Any]) -> str:
    lines = ["# HTTP API", "",
             "Generated from the service's OpenAPI schema by `scripts/gen_docs.py`; a running service shows the "
             "same at `/docs` (interactive) and `/openapi.json`. The write routes exist only when writes are "
             "enabled, the admin routes only with an admin token (see [Operations](../operations.md)). "
             "Limits and error answers: [Limits and errors](../limits.md).", ""]
    lines += ["| method | path | what |", "|---|---|---|"]
    ops = [(path, m, op) for path, item in spec["paths"].items() for m, op in item.items() if m in METHODS]
    for path, method, op in ops:
        lines.append(f"| `{method.upper()}` | `{path}` | {_cell(op.get('summary'))} |")
    for path, method, op in ops:
        lines += ["", f"## `{method.upper()} {path}`", ""]
        if op.get("description"):
            lines += [op["description"].strip(), ""]
        params = op.get("parameters") or []
        if params:
            lines += ["| parameter | in | required | type | description |", "|---|---|---|---|---|"]
            for p in params:
                lines.append(f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | "
                             f"{_cell(_schema_name(p.get('schema', {})))} | {_cell(p.get('description'))} |")
            lines.append("")
        body = op.get("requestBody", {}).get("content", {})
        for media, content in body.items():
            lines.append(f"- request body (`{media}`): {_cell(_schema_name(content.get('schema', {})))}")
        if body:
            lines.append("")
        lines += ["| status | answer |", "|---|---|"]
        for status, resp in op.get("responses", {}).items():
            schema = next(iter(resp.get("content", {}).values()), {}).get("schema")
            shape = f" ({_cell(_schema_name(schema))})" if schema else ""
            lines.append(f"| {status} | {_cell(resp.get('description'))}{shape} |")
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        lines += ["", "## Schemas"]
        for name, schema in sorted(schemas.items()):
            lines += ["", f"### {name}", ""]
            if schema.get("description"):
                lines += [_cell(schema["description"]), ""]
            props = schema.get("properties", {})
            if not props:
                lines.append(f"`{_cell(json.dumps({k: v for k, v in schema.items() if k != 'title'}))[:300]}`")
                continue
            required = set(schema.get("required", []))
            lines += ["| field | type | required | description |", "|---|---|---|---|"]
            for field, sub in props.items():
                lines.append(f"| `{field}` | {_cell(_schema_name(sub))} | {'yes' if field in required else 'no'} | "
                             f"{_cell(sub.get('description'))} |")
    return "\n".join(lines) + "\n"


def _help(parser: argparse.ArgumentParser) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        parser.print_help()
    return buf.getvalue()


def cli_page() -> str:
    os.environ.setdefault("COLUMNS", "100")  # argparse wraps to the terminal; fix it for a stable page
    from offline.console import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command line", "",
             "Generated from the parsers by `scripts/gen_docs.py`. `clipsearch COMMAND` and "
             "`python -m offline COMMAND` run the same stages (`serve` and `search` only exist as "
             "`clipsearch`); `bash scripts/serve.sh` is `clipsearch serve` after setting up the environment.",
             "", "```text", _help(parser).rstrip(), "```"]
    for name, p in sub.choices.items():
        lines += ["", f"## `clipsearch {name}`", "", "```text", _help(p).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """The generated pages by their path under docs/."""
    return {"reference/http.md": http_page(_openapi()), "reference/cli.md": cli_page()}


def generate(docs: Path = REPO / "docs") -> list[Path]:
    """Write the pages whose text changed; returns them."""
    changed = []
    for rel, text in pages().items():
        path = docs / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=REPO / "docs", help="the docs folder (default: %(default)s)")
    args = ap.parse_args(argv)
    for path in generate(args.docs):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
