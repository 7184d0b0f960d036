"""clipsearch/keys.py and `python -m offline keys`: the keys file format, atomic writes, a malformed
file refused at start-up with its line number, and the helpers a `serve` command calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipsearch import keys as K
from offline.cli import main as offline_main

REPO = Path(__file__).resolve().parents[1]


def test_add_list_revoke_store_only_hashes(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    assert offline_main(["keys", "add", "alice", "--scope", "write", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    import json

    made = json.loads(out)
    key = made["key"]
    assert made["name"] == "alice" and made["scope"] == "write" and len(key) >= 40
    text = path.read_text()
    assert key not in text and f"alice:write:{K.hash_key(key)}" in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert K.lookup(K.read_keys_file(path), key) == K.ApiKey("alice", "write", K.hash_key(key))

    assert offline_main(["keys", "add", "bob", "--file", str(path)]) == 0
    bob = json.loads(capsys.readouterr().out)["key"]
    assert bob != key
    assert offline_main(["keys", "list", "--file", str(path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["keys"] == [{"name": "alice", "scope": "write"}, {"name": "bob", "scope": "read"}]
    assert key not in json.dumps(listed) and K.hash_key(key) not in json.dumps(listed)

    assert offline_main(["keys", "add", "alice", "--file", str(path)]) == 2  # names are unique
    assert "already exists" in capsys.readouterr().err
    assert offline_main(["keys", "revoke", "alice", "--file", str(path)]) == 0
    assert [k.name for k in K.read_keys_file(path)] == ["bob"]
    assert offline_main(["keys", "revoke", "alice", "--file", str(path)]) == 2
    assert offline_main(["keys", "add", "no:colons", "--file", str(path)]) == 2


def test_keys_file_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(K.KEYS_FILE_VAR, raising=False)
    assert offline_main(["keys", "list"]) == 2
    assert K.KEYS_FILE_VAR in capsys.readouterr().err
    monkeypatch.setenv(K.KEYS_FILE_VAR, str(tmp_path / "env-keys.txt"))
    assert offline_main(["keys", "add", "carol", "--scope", "admin"]) == 0
    assert K.read_keys_file(tmp_path / "env-keys.txt")[0].scope == "admin"


def test_the_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keys.txt"
    K.add_key(path, "alice", "read")
    before = path.read_bytes()

    def fail(*_):
        raise OSError("disk full")

    import clipsearch.manifest as manifest

    monkeypatch.setattr(manifest.os, "replace", fail)
    with pytest.raises(OSError):
        K.add_key(path, "bob", "read")
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.txt"]  # no temporary left behind


@pytest.mark.parametrize("line,message", [
    ("alice:read", "line 3: expected name:scope:sha256"),
    ("alice:root:" + "0" * 64, "line 3: unknown scope"),
    ("alice:read:my-secret-key-in-clear", "line 3: the third field must be the key's sha256"),
    ("bad name:read:" + "0" * 64, "line 3: the name must be"),
    ("bob:read:" + "1" * 64, "line 3: the name 'bob' is already used on line 2"),
])
def test_malformed_files_name_the_line_and_never_echo_it(line, message):
    text = "# keys\nbob:read:" + "a" * 64 + "\n" + line + "\n"
    with pytest.raises(K.KeyFileError, match=message) as info:
        K.parse_keys(text)
    assert "my-secret-key-in-clear" not in str(info.value)


def test_a_malformed_file_stops_the_service_at_start_up(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# ok\nalice:read:" + "a" * 64 + "\nalice-key-pasted-here\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLIPSEARCH_API_KEYS_FILE": str(path),
           "ARTIFACTS_DIR": str(tmp_path / "none")}
    run = subprocess.run([sys.executable, "-c", "import app.main"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "line 3: expected name:scope:sha256" in run.stderr
    assert "alice-key-pasted-here" not in run.stderr


def test_missing_file_is_refused_with_the_command_to_make_one(tmp_path):
    with pytest.raises(K.KeyFileError, match="does not exist; make a key with `python -m offline keys add"):
        K.KeyRing(path=tmp_path / "nope.txt")


def test_lookup_compares_every_entry_with_compare_digest(monkeypatch):
    keys = [K.ApiKey(f"k{i}", "read", K.hash_key(f"key-{i}")) for i in range(5)]
    seen = []
    real = K.hmac.compare_digest
    monkeypatch.setattr(K.hmac, "compare_digest", lambda a, b: seen.append(b) or real(a, b))
    assert K.lookup(keys, "key-0").name == "k0"
    assert len(seen) == 5  # no early exit after the match
    seen.clear()
    assert K.lookup(keys, "nope") is None and len(seen) == 5


def test_env_keys_and_scopes():
    env = {"CLIPSEARCH_API_KEY": "a" * 20, "CLIPSEARCH_WRITE_TOKEN": "w" * 20, "CLIPSEARCH_ADMIN_TOKEN": ""}
    got = {k.name: k.scope for k in K.env_keys(env)}
    assert got == {"env:admin": "admin", "env:write": "write"}
    with pytest.raises(K.KeyFileError, match="at least 16"):
        K.env_keys({"CLIPSEARCH_API_KEY": "short"})
    reader = K.ApiKey("r", "read", "0" * 64)
    assert reader.allows("read") and not reader.allows("write")
    assert K.ApiKey("a", "admin", "0" * 64).allows("write")


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                           ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                           ("::", False), ("192.168.1.5", False), ("example.com", False)])
def test_bind_is_loopback(host, loopback):
    assert K.bind_is_loopback(host) is loopback


def test_serve_refusal_and_auth_configured():
    assert K.serve_refusal("127.0.0.1", {}) is None
    line = K.serve_refusal("0.0.0.0", {})
    assert line and "\n" not in line and "clipsearch keys add" in line
    for env in ({"CLIPSEARCH_API_KEYS_FILE": "keys.txt"}, {"CLIPSEARCH_API_KEY": "x" * 20},
                {"CLIPSEARCH_WRITE_TOKEN": "x" * 20}, {"CLIPSEARCH_AUTH": "off"}):
        assert K.auth_configured(env) and K.serve_refusal("0.0.0.0", env) is None
    assert not K.auth_configured({"CLIPSEARCH_API_KEY": "  "})


def test_client_is_loopback():
    assert K.client_is_loopback("127.0.0.1") and K.client_is_loopback("::ffff:127.0.0.1")
    assert K.client_is_loopback(None)  # a Unix socket
    assert not K.client_is_loopback("testclient") and not K.client_is_loopback("10.0.0.1")
