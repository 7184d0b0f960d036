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
    ]
    broken = make_client(encoder=fakes.BrokenEncoder(), raise_server_exceptions=False)
    responses.append(broken.post("/search/text", json={"query": "red"}))  # 500, generic
    copy = Path(shutil.copytree(tiny_artifacts, tmp_path / "broken"))
    (copy / "embeddings/test/manifest.json").write_text("{")
    unready = make_client(resources=None, artifacts_dir=copy)
    deadline = time.monotonic() + 30
    while (r := unready.get("/readyz")).json().get("reason", "").startswith("loading"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    responses += [r, unready.post("/search/text", json={"query": "red"})]  # 503s with the reason
    assert "manifest.json" in r.json()["reason"]
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


def test_serving_writes_nothing_under_artifacts(make_client, tiny_artifacts, tmp_path, fakes):
    """What a read-only mount needs (the tests run as root, so a chmod would prove nothing)."""
    artifacts = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(artifacts)): (p.stat().st_mtime_ns, p.stat().st_size)
                for p in artifacts.rglob("*")}

    before = tree()
    client = make_client(resources=None, artifacts_dir=artifacts)
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)
    assert client.post("/search/text", json={"query": "red"}).status_code == 200
    data = fakes.png_bytes(fakes.image("solid", "red"))
    assert client.post("/search/image", files={"file": ("a.png", data, "image/png")}).status_code == 200
    assert tree() == before
