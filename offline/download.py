"""Download and unpack the Flickr8k release archives (resumable, checksummed, safe unzip).

Each file is streamed to ``<dest>/<name>.part``; an interrupted download resumes with an HTTP
Range request. The finished file's sha256 is checked against ``checksums`` when given and
always recorded in ``<dest>/download_manifest.json``, which also lets a rerun skip finished work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from tqdm import tqdm

from clipsearch.manifest import sha256_file
from clipsearch.manifest import write_json_atomic as _write_json

__all__ = ["DEFAULT_URLS", "DownloadError", "download"]

_RELEASE = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
#: The widely used copies of the original Flickr8k archives (no published checksums).
DEFAULT_URLS: dict[str, str] = {
    "Flickr8k_Dataset.zip": f"{_RELEASE}/Flickr8k_Dataset.zip",
    "Flickr8k_text.zip": f"{_RELEASE}/Flickr8k_text.zip",
}
MANIFEST_NAME = "download_manifest.json"
_CHUNK = 1 << 16
_NO_NETWORK_HINT = ("check the network connection, or pass --data with a local copy of "
                    "Flickr8k instead of downloading it")


class DownloadError(RuntimeError):
    """A download or unpack step failed; the message says what to do about it."""


def download(dest: Path, urls: dict[str, str] | None = None,
             checksums: dict[str, str] | None = None, force: bool = False,
             timeout: float = 30.0) -> Path:
    """Download ``urls`` (file name -> URL) into ``dest`` and unpack the zip archives there.

    Args:
        dest: target folder (created if needed).
        urls: files to fetch; defaults to :data:`DEFAULT_URLS`.
        checksums: optional file name -> expected sha256 (hex).
        force: re-download and re-unpack even if the manifest says it is done.
        timeout: seconds to wait for the server between bytes.

    Returns:
        ``dest``, ready to pass to ``offline.data.prepare``.

    Raises:
        DownloadError: network failure, bad HTTP status, checksum mismatch, unsafe or corrupt zip.
    """
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    urls = dict(DEFAULT_URLS if urls is None else urls)
    checksums = {k: v.lower() for k, v in (checksums or {}).items()}
    manifest_path = dest / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    files: dict[str, Any] = manifest.setdefault("files", {})

    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout)) as client:
        for name, url in urls.items():
            if PurePosixPath(name).name != name or name in ("", ".", ".."):
                raise DownloadError(f"Download file name {name!r} must be a plain file name.")
            target = dest / name
            expected = checksums.get(name)
            entry = files.get(name)
            if force:
                target.unlink(missing_ok=True)
                _part(target).unlink(missing_ok=True)
                entry = None
            if not _is_complete(target, entry, url, expected):
                sha, size = _fetch(client, url, target, expected)
                entry = {"url": url, "sha256": sha, "size": size, "unpacked": False}
                files[name] = entry
                _write_json(manifest_path, manifest)
            else:
                print(f"download: {name} already downloaded "
                      f"(sha256 {entry['sha256'][:12]}...), skipping")
            if name.lower().endswith(".zip") and not entry.get("unpacked"):
                _safe_unzip(target, dest)
                entry["unpacked"] = True
                _write_json(manifest_path, manifest)
    return dest


def _part(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _read_manifest(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _is_complete(target: Path, entry: dict | None, url: str, expected: str | None) -> bool:
    # Trust the recorded hash when size matches: re-hashing a 1 GB zip on every run is wasteful.
    if not entry or not target.is_file() or entry.get("url") != url:
        return False
    if entry.get("size") != target.stat().st_size or not entry.get("sha256"):
        return False
    return expected is None or entry["sha256"] == expected


def _net_error(url: str, exc: Exception) -> DownloadError:
    return DownloadError(f"Could not download {url} ({type(exc).__name__}: {exc}); "
                         f"{_NO_NETWORK_HINT}.")


def _fetch(client: httpx.Client, url: str, target: Path, expected: str | None) -> tuple[str, int]:
    """Stream ``url`` into ``target`` via a resumable ``.part`` file; return (sha256, size)."""
    part = _part(target)
    for attempt in range(2):  # a second try only after a stale .part is discarded
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 416 and offset:
                    total = _content_range_total(resp.headers.get("content-range"))
                    if total == offset:
                        break                      # the .part already holds the whole file
                    part.unlink()                  # .part larger than the file: start over
                    continue
                if resp.status_code == 206 and offset:
                    start = _content_range_start(resp.headers.get("content-range"))
                    if start != offset:
                        part.unlink()
                        continue
                    mode = "ab"
                elif resp.status_code == 200:
                    offset, mode = 0, "wb"         # server ignored Range: restart from zero
                else:
                    raise DownloadError(f"Server answered HTTP {resp.status_code} for {url}; "
                                        f"{_NO_NETWORK_HINT}.")
                length = resp.headers.get("content-length")
                remaining = int(length) if length and length.isdigit() else None
                total = offset + remaining if remaining is not None else None
                written = 0
                with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B",
                                                  unit_scale=True, desc=target.name,
                                                  disable=None, leave=False) as bar:
                    for chunk in resp.iter_bytes(_CHUNK):
                        fh.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                if remaining is not None and written != remaining:
                    raise DownloadError(f"Download of {url} stopped after {offset + written} of "
                                        f"{total} bytes; run again to resume.")
                break
        except httpx.HTTPError as exc:
            raise _net_error(url, exc) from exc
    else:
        raise DownloadError(f"Could not resume {url}: the server keeps rejecting "
                            "the range request.")

    sha = sha256_file(part)
    if expected is not None and sha != expected:
        part.unlink()  # corrupt bytes are useless for resuming
        raise DownloadError(f"Checksum mismatch for {target.name}: expected sha256 {expected}, "
                            f"got {sha}; the partial file was deleted, run again to retry.")
    size = part.stat().st_size
    os.replace(part, target)
    print(f"download: {target.name} complete ({size:,} bytes, sha256 {sha[:12]}...)")
    return sha, size


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _safe_unzip(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``, refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = []
            for info in zf.infolist():
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts):
                    raise DownloadError(f"Refusing to unpack {archive.name}: member "
                                        f"{info.filename!r} points outside the target folder.")
                if parts and parts[0] == "__MACOSX":  # macOS resource forks, not data
                    continue
                members.append((info, dest.joinpath(*parts) if parts else dest))
            # Validate everything before writing anything, so a hostile zip leaves no trace.
            for info, out in members:
                if not out.resolve().is_relative_to(dest):
                    raise DownloadError(f"Refusing to unpack {archive.name}: member "
                                        f"{info.filename!r} points outside the target folder.")
            for info, out in tqdm(members, desc=f"unpacking {archive.name}", unit="file",
                                  disable=None, leave=False):
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive.name} is not a valid zip archive ({exc}); "
                            "run the download again with force to fetch it anew.") from exc
