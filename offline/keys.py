"""`python -m offline keys add|list|revoke`: the service's API keys file (clipsearch/keys.py).

    python -m offline keys add alice --scope read --file keys.txt   # prints the new key, once
    python -m offline keys list --file keys.txt                     # names and scopes, never a key
    python -m offline keys revoke alice --file keys.txt

The file is `--file`, else $CLIPSEARCH_API_KEYS_FILE. Only each key's sha256 is stored, and every
change replaces the file atomically; a running service picks the change up within a second (or at
once on SIGHUP).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from clipsearch.keys import KEYS_FILE_VAR, SCOPES, add_key, read_keys_file, revoke_key


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="make, list and revoke the service's API keys (only hashes are stored)")
    actions = p.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="make a new random key; it is printed once and stored as a hash")
    add.add_argument("name", help="the key's name (1-64 of A-Z a-z 0-9 _ . -), shown in logs and metrics")
    add.add_argument("--scope", choices=SCOPES, default="read",
                     help="read: search and view; write: also add/delete media; admin: also reload and "
                          "compact (default: %(default)s)")
    listing = actions.add_parser("list", help="the keys' names and scopes")
    revoke = actions.add_parser("revoke", help="remove a key (its page sessions end too)")
    revoke.add_argument("name")
    for q in (add, listing, revoke):
        q.add_argument("--file", type=Path, default=None,
                       help=f"the keys file (default: ${KEYS_FILE_VAR})")


def _file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return args.file
    env = os.environ.get(KEYS_FILE_VAR, "").strip()
    if not env:
        raise ValueError(f"no keys file: pass --file or set {KEYS_FILE_VAR}")
    return Path(env)


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = _file(args)
    if args.keys_action == "add":
        key, entry = add_key(path, args.name, args.scope)
        return {"name": entry.name, "scope": entry.scope, "key": key, "file": str(path),
                "note": "the key is shown this once; only its sha256 is stored. Send it as "
                        "`Authorization: Bearer KEY` or `X-API-Key: KEY`, or sign in with it on the search page"}
    if args.keys_action == "list":
        keys = read_keys_file(path) if path.exists() else []
        return {"file": str(path), "keys": [{"name": k.name, "scope": k.scope} for k in keys]}
    gone = revoke_key(path, args.name)
    return {"file": str(path), "revoked": gone.name, "scope": gone.scope}
