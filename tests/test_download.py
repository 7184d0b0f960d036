"""Tests for offline.download against a loopback HTTP server serving a zip made in the test."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from offline.download import DownloadError, download


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


ARCHIVE = _zip_bytes({"Flickr8k_text/Flickr8k.token.txt": b"a.jpg#0\tA dog .\n",
                      "Flicker8k_Dataset/a.jpg": b"\xff\xd8" + bytes(range(256)) * 40,
                      "__MACOSX/._a.jpg": b"junk"})
SHA = hashlib.sha256(ARCHIVE).hexdigest()


class _Server:
    """Serves ``files`` on 127.0.0.1; honours Range unless ``ranges`` is False; logs requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and outer.ranges:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    srv = _Server({"data.zip": ARCHIVE})
    yield srv
    srv.close()


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "download_manifest.json").read_text())


def test_full_download_unpack_and_skip(server, tmp_path):
    dest = tmp_path / "dl"
    urls = {"data.zip": f"{server.url}/data.zip"}
    assert download(dest, urls) == dest.resolve()
    assert (dest / "data.zip").read_bytes() == ARCHIVE
    assert (dest / "Flickr8k_text" / "Flickr8k.token.txt").read_text().startswith("a.jpg#0")
    assert (dest / "Flicker8k_Dataset" / "a.jpg").stat().st_size == 2 + 256 * 40
    assert not (dest / "__MACOSX").exists()
    assert not (dest / "data.zip.part").exists()
    entry = _manifest(dest)["files"]["data.zip"]
    assert entry["sha256"] == SHA and entry["size"] == len(ARCHIVE) and entry["unpacked"]

    n = len(server.requests)
    download(dest, urls, checksums={"data.zip": SHA})
    assert len(server.requests) == n            # complete + checksum recorded: no request
    download(dest, urls, force=True)
    assert len(server.requests) == n + 1


def test_resume_partial_download(server, tmp_path):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.zip.part").write_bytes(ARCHIVE[:1000])
    download(dest, {"data.zip": f"{server.url}/data.zip"}, checksums={"data.zip": SHA})
    assert server.requests == [("/data.zip", "bytes=1000-")]
    assert (dest / "data.zip").read_bytes() == ARCHIVE


def test_resume_when_server_ignores_range(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.zip.part").write_bytes(b"stale bytes that are not the start of the file")
    download(dest, {"data.zip": f"{server.url}/data.zip"}, checksums={"data.zip": SHA})
    assert (dest / "data.zip").read_bytes() == ARCHIVE


def test_part_already_complete(server, tmp_path):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.zip.part").write_bytes(ARCHIVE)
    download(dest, {"data.zip": f"{server.url}/data.zip"})
    assert (dest / "data.zip").read_bytes() == ARCHIVE


def test_checksum_mismatch(server, tmp_path):
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError, match="Checksum mismatch"):
        download(dest, {"data.zip": f"{server.url}/data.zip"}, checksums={"data.zip": "0" * 64})
    assert not (dest / "data.zip").exists() and not (dest / "data.zip.part").exists()


def test_http_error_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(tmp_path / "dl", {"x.zip": f"{server.url}/nope.zip"})


def test_connection_refused(tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:          # grab a free port, then leave nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="--data"):
        download(tmp_path / "dl", {"data.zip": f"http://127.0.0.1:{port}/data.zip"}, timeout=5)


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_unsafe_zip_rejected(server, tmp_path, member):
    server.files["bad.zip"] = _zip_bytes({"fine.txt": b"ok", member: b"pwned"})
    dest = tmp_path / "a" / "dl"
    with pytest.raises(DownloadError, match="outside"):
        download(dest, {"bad.zip": f"{server.url}/bad.zip"})
    assert not (tmp_path / "a" / "evil.txt").exists() and not (dest / "fine.txt").exists()


def test_bad_zip(server, tmp_path):
    server.files["broken.zip"] = b"not a zip"
    with pytest.raises(DownloadError, match="not a valid zip"):
        download(tmp_path / "dl", {"broken.zip": f"{server.url}/broken.zip"})
