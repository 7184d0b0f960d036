"""Security of the service's answers: no stack traces or paths in any error, CORS only as configured,
body caps on every path, and nothing written under a (read-only) ARTIFACTS_DIR."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

LEAK_MARKERS = ("Traceback", 'File "', "site-packages", "/usr/lib/python", ".py\", line")


def _assert_clean(r, *paths: str) -> None:
    for marker in LEAK_MARKERS + tuple(paths):
        assert marker not in r.text, (r.status_code, marker, r.text[:300])


def test_no_stack_traces_or_paths_in_any_error(make_client, fakes, dataset, tmp_path, tiny_artifacts):
    images_dir = str(Path(dataset[0][0]["image_path"]).parent)
    secrets = (str(tmp_path), images_dir, str(tiny_artifacts))
    client = make_client(max_in_flight=1, max_upload_bytes=2048)
    responses = [
        client.get("/nope"),                                                   # 404 route
        client.get("/images/does-not-exist.png"),                              # 404 id
        client.put("/search/text", json={"query": "red"}),                     # 405
        client.post("/search/text", content=b"x" * 70_000,
                    headers={"content-type": "application/json"}),             # 413
        client.post("/search/text", content=b"{}", headers={"content-type": "text/plain"}),  # 415
        client.post("/search/text", content=b'{"query": "\xff"}',
                    headers={"content-type": "application/json"}),             # 400
        client.post("/search/text", json={"query": ""}),                       # 422
        client.post("/search/image", files={"file": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 99,
                                                      "image/png")}),          # 422 image
        client.post("/search/image", files={"file": ("x.png", b"\x00" * 4096, "image/png")}),  # 413
        client.post("/search/image", content=b"--x\r\n",
                    headers={"content-type": "multipart/form-data; boundary=x"}),  # 400 multipart
        client.post("/search/text", json={"query": "red", "collection": "nope"}),  # 404 collection
        client.post("/search/similar", json={"image_id": "/etc/passwd"}),       # 404 id
        client.get("/thumbnails/does-not-exist.png"),                          # 404 id
        client.get("/thumbnails/00_solid_red.png", params={"collection": "nope"}),  # 404 collection
        client.get("/collections/nope/items/00_solid_red.png"),                # 404 collection
        client.post("/search/text", json={"query": "red", "filter": {"kind": {"$ne": 1}}}),  # 422 filter
    ]
    broken = make_client(encoder=fakes.BrokenEncoder(), raise_server_exceptions=False)
    responses.append(broken.post("/search/text", json={"query": "red"}))  # 500, generic
    copy = Path(shutil.copytree(tiny_artifacts, tmp_path / "broken"))
    (copy / "collections/tiny/catalog.sqlite").write_bytes(b"not a database " * 100)
    unready = make_client(resources=None, artifacts_dir=copy)
    deadline = time.monotonic() + 30
    while (r := unready.get("/readyz")).json().get("reason", "").startswith("loading"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    responses += [r, unready.post("/search/text", json={"query": "red"})]  # 503s with the reason
    assert "catalog.sqlite cannot be read" in r.json()["reason"]
    statuses = {r.status_code for r in responses}
    assert {400, 404, 405, 413, 415, 422, 500, 503} <= statuses
    for r in responses:
        _assert_clean(r, *secrets)


def test_cors_preflight_only_for_configured_origins(make_client):
    client = make_client(cors_origins="https://ui.example")
    pre = client.options("/search/text", headers={"Origin": "https://ui.example",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://ui.example"
    other = client.post("/search/text", json={"query": "red"}, headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    bad_pre = client.options("/search/text", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert bad_pre.status_code == 400 and "access-control-allow-origin" not in bad_pre.headers
    # without configuration a preflight is just an unsupported method: no CORS headers at all
    plain = make_client().options("/search/text", headers={"Origin": "https://ui.example",
                                                            "Access-Control-Request-Method": "POST"})
    assert plain.status_code == 405 and not any(h.startswith("access-control") for h in plain.headers)


@pytest.mark.parametrize("method,path", [("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/admin/reload"),
                                         ("GET", "/images/00_solid_red.png"), ("POST", "/nope")])
def test_body_cap_applies_to_every_path(make_client, method, path):
    client = make_client(admin_token="a-long-enough-admin-token")
    r = client.request(method, path, content=b"x" * (65 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("mount", ["read-only", "writable"])
def test_serving_writes_nothing_under_artifacts(make_client, tiny_artifacts, tmp_path, fakes, monkeypatch, mount):
    """What a read-only mount needs (the tests run as root, so a chmod would prove nothing).

    On a read-only mount (simulated: the catalog's folder reports itself unwritable, as access(2)
    does on a read-only file system even for root) not one file under ARTIFACTS_DIR changes or
    appears. On a writable one the only new files are SQLite's own WAL reader files beside the
    catalog (`-wal`, `-shm`): a WAL database's readers need them to see a writer's commits; the
    catalog itself is not touched."""
    artifacts = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))
    catalog = artifacts / "collections/tiny/catalog.sqlite"
    if mount == "read-only":
        import clipsearch.store.catalog as catalog_module

        monkeypatch.setattr(catalog_module, "_writable", lambda folder: False)

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(artifacts)): (p.stat().st_mtime_ns, p.stat().st_size)
                for p in artifacts.rglob("*")}

    before = tree()
    catalog_bytes = catalog.read_bytes()
    client = make_client(resources=None, artifacts_dir=artifacts)
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)
    assert client.post("/search/text", json={"query": "red"}).status_code == 200
    data = fakes.png_bytes(fakes.image("solid", "red"))
    assert client.post("/search/image", files={"file": ("a.png", data, "image/png")}).status_code == 200
    assert client.get("/thumbnails/00_solid_red.png").status_code == 200
    assert client.get("/collections").status_code == 200
    after = tree()
    assert catalog.read_bytes() == catalog_bytes
    if mount == "read-only":
        assert after == before
    else:
        wal_files = {"collections/tiny/catalog.sqlite-wal", "collections/tiny/catalog.sqlite-shm"}
        assert set(after) - set(before) <= wal_files
        changed = {p for p in before if after.get(p) != before[p]}
        # the folder's mtime (those files appearing), and those files if an earlier reader of the
        # session's artifacts had left them there to be copied
        assert changed <= {"collections/tiny", *wal_files}, changed
