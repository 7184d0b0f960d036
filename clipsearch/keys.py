"""API keys and scopes: the one access model of the service, without any HTTP in it.

A key is a random string a client presents; the service keeps only its sha256. Scopes are ordered,
`read` < `write` < `admin`: a key opens every route of its scope and of the scopes below it.

The keys file (`CLIPSEARCH_API_KEYS_FILE`, written by `python -m offline keys`) holds one key a line:

    # comments and blank lines are ignored
    alice:read:<64 hex digits: sha256 of the key>
    deploy-bot:write:<sha256>

Names are 1-64 of `A-Z a-z 0-9 _ . -` (so never a `:`), unique in the file. Keys can also come from
the environment: `CLIPSEARCH_API_KEY` (one admin key) and the older `CLIPSEARCH_WRITE_TOKEN` /
`CLIPSEARCH_ADMIN_TOKEN` (a key of that scope, named `env:write` / `env:admin`).

Every lookup compares the presented key's hash with every stored hash through
`hmac.compare_digest` (no early exit on the first match either), so neither the key nor which
entry matched shows in the time an answer takes. A key never appears in an error message, log
line or metrics label: only its name does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from clipsearch.manifest import atomic_write_text

SCOPES = ("read", "write", "admin")
RANK = {scope: i for i, scope in enumerate(SCOPES)}
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HASH = re.compile(r"[0-9a-f]{64}")
KEY_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 random bits
MIN_ENV_KEY_CHARS = 16
HEADER = ("# clipsearch API keys: name:scope:sha256-of-key, one a line (python -m offline keys add/list/revoke).\n"
          "# Only hashes are stored here; a key is shown once, when it is made.\n")

# The environment variables that configure keys, and the scope of each.
ENV_KEYS = {"CLIPSEARCH_API_KEY": ("env:admin", "admin"), "CLIPSEARCH_ADMIN_TOKEN": ("env:admin-token", "admin"),
            "CLIPSEARCH_WRITE_TOKEN": ("env:write", "write")}
KEYS_FILE_VAR = "CLIPSEARCH_API_KEYS_FILE"


class KeyFileError(ValueError):
    """The keys file cannot be used as it is; the message names the file and the line."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    scope: str
    digest: str  # sha256 hex of the key

    def allows(self, scope: str) -> bool:
        return RANK[self.scope] >= RANK[scope]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (URL-safe, 43 characters)."""
    return secrets.token_urlsafe(KEY_BYTES)


def check_scope(scope: str) -> str:
    if scope not in RANK:
        raise ValueError(f"unknown scope {scope!r}: one of {', '.join(SCOPES)}")
    return scope


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"key name {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    return name


def parse_keys(text: str, source: str = "keys file") -> list[ApiKey]:
    """The keys of a keys file's text; a line that is not `name:scope:sha256` raises KeyFileError
    naming `source` and the line number (never the line itself: it could hold a key pasted by mistake)."""
    keys: list[ApiKey] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        where = f"{source} line {number}"
        if len(parts) != 3:
            raise KeyFileError(f"{where}: expected name:scope:sha256 (three fields separated by ':'), "
                               f"found {len(parts)} field(s)")
        name, scope, digest = (p.strip() for p in parts)
        if not NAME.fullmatch(name):
            raise KeyFileError(f"{where}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
        if scope not in RANK:
            raise KeyFileError(f"{where}: unknown scope (one of {', '.join(SCOPES)})")
        if not HASH.fullmatch(digest.lower()):
            raise KeyFileError(f"{where}: the third field must be the key's sha256 (64 hex digits), "
                               "not the key itself")
        if name in seen:
            raise KeyFileError(f"{where}: the name {name!r} is already used on line {seen[name]}")
        seen[name] = number
        keys.append(ApiKey(name, scope, digest.lower()))
    return keys


def read_keys_file(path: str | os.PathLike[str]) -> list[ApiKey]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"keys file {path} does not exist; make a key with "
                           f"`python -m offline keys add NAME --scope read --file {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"keys file {path} cannot be read ({type(exc).__name__})") from None
    return parse_keys(text, f"keys file {path}")


def format_keys(keys: Iterable[ApiKey]) -> str:
    return HEADER + "".join(f"{k.name}:{k.scope}:{k.digest}\n" for k in keys)


def write_keys_file(path: str | os.PathLike[str], keys: Iterable[ApiKey]) -> None:
    """Replace the keys file atomically (a reader sees the old or the new file, never half of one),
    readable by its owner only."""
    path = Path(path)
    text = format_keys(keys)
    parse_keys(text, str(path))  # never write what could not be read back
    atomic_write_text(path, text)
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass


def add_key(path: str | os.PathLike[str], name: str, scope: str) -> tuple[str, ApiKey]:
    """Make a new random key `name` of `scope` in the keys file (created if missing); return the key
    (shown once, stored nowhere) and its entry."""
    check_name(name)
    check_scope(scope)
    path = Path(path)
    keys = read_keys_file(path) if path.exists() else []
    if any(k.name == name for k in keys):
        raise ValueError(f"a key named {name!r} already exists in {path}; revoke it first or pick another name")
    key = new_key()
    entry = ApiKey(name, scope, hash_key(key))
    write_keys_file(path, [*keys, entry])
    return key, entry


def revoke_key(path: str | os.PathLike[str], name: str) -> ApiKey:
    path = Path(path)
    keys = read_keys_file(path)
    gone = [k for k in keys if k.name == name]
    if not gone:
        raise ValueError(f"no key named {name!r} in {path}")
    write_keys_file(path, [k for k in keys if k.name != name])
    return gone[0]


def env_keys(env: Mapping[str, str | None]) -> list[ApiKey]:
    """The keys the environment configures (CLIPSEARCH_API_KEY and the older token variables)."""
    out = []
    for var, (name, scope) in ENV_KEYS.items():
        value = (env.get(var) or "").strip()
        if value:
            if len(value) < MIN_ENV_KEY_CHARS:
                raise KeyFileError(f"{var} must be at least {MIN_ENV_KEY_CHARS} characters")
            out.append(ApiKey(name, scope, hash_key(value)))
    return out


def lookup(keys: Iterable[ApiKey], presented: str) -> ApiKey | None:
    """The entry whose hash matches `presented`, compared in constant time with every entry (the loop
    does not stop at a match, so the time does not say which entry it was)."""
    digest = hash_key(presented).encode()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest.encode()):
            found = key
    return found


class KeyRing:
    """The keys in force: the environment's plus the keys file's, re-read when the file changes.

    `maybe_reload()` costs one stat at most every `check_interval_s`; `reload()` (SIGHUP) re-reads now.
    A file that turns malformed while serving keeps the keys read last and records why (`error`); at
    start-up (`KeyRing(...)`) a malformed or missing file raises KeyFileError instead.
    """

    def __init__(self, fixed: Iterable[ApiKey] = (), path: str | os.PathLike[str] | None = None,
                 check_interval_s: float = 1.0):
        self.fixed = list(fixed)
        self.path = Path(path) if path is not None else None
        self.check_interval_s = check_interval_s
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._keys = list(self.fixed)
        if self.path is not None:
            self._load(strict=True)

    @property
    def configured(self) -> bool:
        """Whether any key source is configured (then every client must present a key)."""
        return bool(self.fixed) or self.path is not None

    @property
    def keys(self) -> list[ApiKey]:
        return self._keys

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, strict: bool) -> bool:
        stamp = self._file_stamp()
        try:
            from_file = read_keys_file(self.path)  # type: ignore[arg-type]
        except KeyFileError as exc:
            if strict:
                raise
            self.error = str(exc)
            self._stamp = stamp  # do not re-parse the same broken file on every request
            return False
        self._keys = [*self.fixed, *from_file]  # file names have no ':', so never an env name
        self._stamp = stamp
        self.error = None
        return True

    def reload(self) -> bool:
        """Re-read the keys file now; False (keys unchanged, `error` set) if it is malformed."""
        if self.path is None:
            return True
        with self._lock:
            return self._load(strict=False)

    def maybe_reload(self, now: float) -> bool | None:
        """Re-read the file if it changed (checked at most every `check_interval_s`): None when it was
        not re-read, else whether the new file was taken."""
        if self.path is None or now - self._checked < self.check_interval_s:
            return None
        self._checked = now
        if self._file_stamp() == self._stamp:
            return None
        return self.reload()

    def find(self, presented: str) -> ApiKey | None:
        return lookup(self._keys, presented)

    def get(self, name: str) -> ApiKey | None:
        for key in self._keys:
            if key.name == name:
                return key
        return None


def keyring_from_env(env: Mapping[str, str | None], check_interval_s: float = 1.0) -> KeyRing:
    path = (env.get(KEYS_FILE_VAR) or "").strip()
    return KeyRing(env_keys(env), Path(path) if path else None, check_interval_s)


def auth_configured(env: Mapping[str, str | None] | None = None) -> bool:
    """True when the environment configures at least one API key source (CLIPSEARCH_API_KEYS_FILE,
    CLIPSEARCH_API_KEY, CLIPSEARCH_WRITE_TOKEN or CLIPSEARCH_ADMIN_TOKEN) or turns auth off on purpose
    (CLIPSEARCH_AUTH=off): then serving on a non-loopback address is allowed."""
    env = os.environ if env is None else env
    if auth_disabled(env):
        return True
    return bool((env.get(KEYS_FILE_VAR) or "").strip()) or any((env.get(v) or "").strip() for v in ENV_KEYS)


def auth_disabled(env: Mapping[str, str | None] | None = None) -> bool:
    env = os.environ if env is None else env
    return (env.get("CLIPSEARCH_AUTH") or "").strip().lower() == "off"  # as app.config.Settings.auth


def bind_is_loopback(host: str) -> bool:
    """Whether binding `host` only reaches this machine: 127.0.0.0/8, ::1, `localhost`. `0.0.0.0`,
    `::`, a LAN address or another name is not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_is_loopback(host: str | None) -> bool:
    """Whether a connection's peer address is this machine. A missing address (a Unix socket) is
    local too; anything that is not an IP address is not."""
    if host is None:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def serve_refusal(host: str, env: Mapping[str, str | None] | None = None) -> str | None:
    """The one line a `serve` command prints (and exits 2) when binding `host` with no key configured,
    or None when it may go ahead."""
    if bind_is_loopback(host) or auth_configured(env):
        return None
    return (f"refusing to serve on {host} without an API key: make one with `clipsearch keys add NAME "
            "--scope admin --file keys.txt` and set CLIPSEARCH_API_KEYS_FILE=keys.txt (or CLIPSEARCH_API_KEY), "
            "or set CLIPSEARCH_AUTH=off on a trusted network")
