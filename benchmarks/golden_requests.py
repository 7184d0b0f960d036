"""The service's answers to a fixed set of ~70 requests, to tell whether a refactor changed any.

    python benchmarks/golden_requests.py --out before.json     # before the change
    python benchmarks/golden_requests.py --compare before.json # after it: exit 1 on any difference

Builds the tests' fixed collection (12 tiny synthetic images, their captions, the deterministic
`ColorEncoder` of tests/app/conftest.py) in a temporary ARTIFACTS_DIR, serves it writable through
FastAPI's TestClient, and sends every kind of search (text, image as multipart / base64 / with
captions as target, similar, vector, weighted terms), the embeddings, the collection and item
listings, the media, the writes (upload, the same upload again, caption replace, delete) and the
errors each route answers (401/404/413/415/422). Each answer is recorded as its status, its content
type and its body, with the timings left out (`took_ms`, `Server-Timing`) and binary bodies as
their sha256. Needs no model, data or network; takes a few seconds. Prints JSON (or the differences).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKEN = "golden-write-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
_TOOK = re.compile(r'"took_ms":\s*-?[0-9.eE+-]+')


def _png(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def _record(name: str, r: Any, tmp: str) -> dict[str, Any]:
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("application/json") or ctype.startswith("text/"):
        body = _TOOK.sub('"took_ms": 0', r.text).replace(tmp, "<TMP>")
        if ctype.startswith("text/plain; version"):  # Prometheus text: only which series exist
            body = "\n".join(sorted({line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and not line.startswith("#")}))
    else:
        body = "sha256:" + hashlib.sha256(r.content).hexdigest()
    return {"name": name, "status": r.status_code, "content_type": ctype, "body": body}


def _app_fakes() -> Any:
    """tests/app/conftest.py (the dataset and the fake encoder), loaded under a name of its own: in a
    pytest run "conftest" is whichever conftest.py was imported first."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "app" / "conftest.py"
    spec = importlib.util.spec_from_file_location("golden_app_fakes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run() -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient
    from PIL import Image

    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import Catalog, NewItem
    fakes = _app_fakes()
    from app.config import Settings
    from app.main import create_app
    from app.resources import make_resources, open_collections

    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, texts = fakes.make_dataset(root / "images")
        enc = fakes.ColorEncoder()
        img = enc.encode_images([Image.open(r["image_path"]) for r in images])
        items = []
        for i, r in enumerate(images):
            caps = [t["caption"] for t in texts if t["image_id"] == r["image_id"]]
            items.append(NewItem(r["image_id"], r["image_path"], img[i], captions=tuple(caps),
                                 caption_vectors=enc.encode_texts(caps) if caps else None,
                                 caption_ids=tuple(t["caption_id"] for t in texts if t["image_id"] == r["image_id"]),
                                 metadata={"kind": r["image_id"].split("_")[1], "index": i}))
        art = root / "artifacts"
        with Catalog(ArtifactLayout(art).collection("test").catalog) as catalog:
            catalog.set_model(fakes.FAKE_MODEL, fakes.ColorEncoder.dim)
            catalog.put(items)
        with sqlite3.connect(ArtifactLayout(art).collection("test").catalog) as conn:  # a fixed identity,
            conn.execute("UPDATE meta SET value = 'golden' WHERE key = 'uid'")  # so versions repeat

        def load(settings: Settings):
            stores, skipped, model, default = open_collections(settings)
            return make_resources(fakes.ColorEncoder(), list(stores.values()), model, default=default,
                                  base_dir=settings.artifacts_dir, skipped=skipped)

        settings = Settings(artifacts_dir=art, torch_threads=1, inference_threads=2, device="cpu",
                            write_token=TOKEN, refresh_interval_ms=0)
        app = create_app(settings, load(settings))
        red = fakes.png_bytes(fakes._image("solid", "red"))
        blue_stripes = fakes.png_bytes(fakes._image("stripes", "blue", "white"))
        new = _png(7)
        with TestClient(app) as c:
            def req(name: str, method: str, path: str, key: bool = True, **kw: Any) -> None:
                # with a key configured, reads need one too (app/auth.py): every request but those
                # recording a refusal carries the write key
                if key:
                    kw["headers"] = {**AUTH, **kw.get("headers", {})}
                out.append(_record(name, c.request(method, path, **kw), tmp))

            T = "/search/text"
            req("healthz", "GET", "/healthz")
            req("readyz", "GET", "/readyz")
            req("collections", "GET", "/collections")
            req("item", "GET", "/collections/test/items/00_solid_red.png")
            req("item_unknown", "GET", "/collections/test/items/nope.png")
            req("item_unknown_collection", "GET", "/collections/nope/items/x")
            req("text", "POST", T, json={"query": "red", "k": 3})
            req("text_cached", "POST", T, json={"query": "red", "k": 3})
            req("text_spaces", "POST", T, json={"query": "  red  ", "k": 3})
            req("text_offset", "POST", T, json={"query": "blue and white", "k": 4, "offset": 2})
            req("text_min_score", "POST", T, json={"query": "green", "k": 10, "min_score": 0.5})
            req("text_filter", "POST", T, json={"query": "pink", "k": 5, "filter": {"kind": "stripes"}})
            req("text_filter_list", "POST", T, json={"query": "pink", "k": 5, "filter": {"kind": ["stripes", "checkerboard"]}})
            req("text_filter_bad", "POST", T, json={"query": "pink", "k": 5, "filter": {"kind": [[1]]}})
            req("text_collection", "POST", T, json={"query": "yellow", "k": 2, "collection": "test"})
            req("text_unknown_collection", "POST", T, json={"query": "yellow", "collection": "nope"})
            req("text_k0", "POST", T, json={"query": "red", "k": 0})
            req("text_empty", "POST", T, json={"query": "   "})
            req("text_extra_field", "POST", T, json={"query": "red", "bogus": 1})
            req("text_wrong_type", "POST", T, content=b"query=red", headers={"content-type": "text/plain"})
            req("text_broken_json", "POST", T, content=b'{"query": ', headers={"content-type": "application/json"})
            req("image_multipart", "POST", "/search/image", files={"file": ("q.png", red, "image/png")}, data={"k": "3"})
            req("image_multipart_cached", "POST", "/search/image", files={"file": ("q.png", red, "image/png")}, data={"k": "3"})
            req("image_captions", "POST", "/search/image", files={"file": ("q.png", blue_stripes, "image/png")},
                data={"k": "4", "target": "captions"})
            req("image_filter", "POST", "/search/image", files={"file": ("q.png", red, "image/png")},
                data={"k": "3", "filter": '{"kind": "solid"}', "offset": "1"})
            req("image_filter_bad", "POST", "/search/image", files={"file": ("q.png", red, "image/png")},
                data={"filter": "[1"})
            req("image_json", "POST", "/search/image", json={"image": base64.b64encode(blue_stripes).decode(), "k": 3})
            req("image_json_captions", "POST", "/search/image",
                json={"image": base64.b64encode(red).decode(), "k": 2, "target": "captions", "min_score": 0.1})
            req("image_bad_bytes", "POST", "/search/image", files={"file": ("q.png", b"not an image", "image/png")})
            req("image_empty", "POST", "/search/image", files={"file": ("q.png", b"", "image/png")})
            req("image_bad_base64", "POST", "/search/image", json={"image": "***"})
            req("image_url_off", "POST", "/search/image", json={"image_url": "http://example.com/x.png"})
            req("similar", "POST", "/search/similar", json={"image_id": "02_solid_blue.png", "k": 3})
            req("similar_filter", "POST", "/search/similar", json={"image_id": "08_stripes_gray_pink.png", "k": 3,
                                                                  "filter": {"kind": "stripes"}})
            req("similar_unknown", "POST", "/search/similar", json={"image_id": "nope.png"})
            vec = enc.text_vector("purple").tolist()
            req("vector", "POST", "/search/vector", json={"vector": vec, "k": 3})
            req("vector_captions", "POST", "/search/vector", json={"vector": vec, "k": 3, "target": "captions"})
            req("vector_wrong_dim", "POST", "/search/vector", json={"vector": [0.1, 0.2], "k": 3})
            req("vector_zero", "POST", "/search/vector", json={"vector": [0.0] * len(vec)})
            req("terms", "POST", "/search", json={"terms": [{"text": "red", "weight": 1}, {"image_id": "02_solid_blue.png", "weight": 0.5}], "k": 4})
            req("terms_image", "POST", "/search", json={"terms": [{"image": base64.b64encode(red).decode(), "weight": 1},
                                                                  {"text": "white", "weight": -0.3}], "k": 4, "target": "captions"})
            req("terms_unknown_id", "POST", "/search", json={"terms": [{"image_id": "nope", "weight": 1}]})
            req("terms_zero_weight", "POST", "/search", json={"terms": [{"text": "red", "weight": 0}]})
            req("embed_text", "POST", "/embed/text", json={"texts": ["red", "a blue square"]})
            req("embed_text_empty", "POST", "/embed/text", json={"texts": []})
            req("embed_image", "POST", "/embed/image", files={"file": ("q.png", red, "image/png")})
            req("embed_image_json", "POST", "/embed/image", json={"image": base64.b64encode(blue_stripes).decode()})
            req("embed_image_bad", "POST", "/embed/image", files={"file": ("q.png", b"GIF89a", "image/gif")})
            req("image_file", "GET", "/images/00_solid_red.png")
            req("image_file_unknown", "GET", "/images/nope.png")
            req("thumbnail", "GET", "/thumbnails/01_solid_green.png")
            M = "/collections/test/media"
            req("upload_unauthorized", "POST", M, key=False, files={"file": ("n.png", new, "image/png")})
            req("upload_bad_image", "POST", M, files={"file": ("n.png", b"nope", "image/png")}, headers=AUTH)
            req("upload_bad_metadata", "POST", M, files={"file": ("n.png", new, "image/png")}, data={"metadata": "[1]"}, headers=AUTH)
            req("upload", "POST", M, files={"file": ("n.png", new, "image/png")},
                data={"caption": ["a noisy red picture", "static"], "metadata": '{"kind": "noise"}'}, headers=AUTH)
            req("upload_again", "POST", M, files={"file": ("n.png", new, "image/png")},
                data={"caption": ["a noisy red picture", "static"], "metadata": '{"kind": "noise"}'}, headers=AUTH)
            req("upload_with_id", "POST", M, files={"file": ("n.png", _png(8), "image/png")},
                data={"image_id": "my-noise", "caption": "green noise"}, headers=AUTH)
            req("text_after_upload", "POST", T, json={"query": "noisy red", "k": 3, "filter": {"kind": "noise"}})
            req("captions_after_upload", "POST", "/search/vector", json={"vector": enc.text_vector("static").tolist(), "k": 2, "target": "captions"})
            req("recaption", "PUT", M + "/my-noise/captions", json={"captions": ["now orange", "and brown"]}, headers=AUTH)
            req("recaption_unknown", "PUT", M + "/nope/captions", json={"captions": ["x"]}, headers=AUTH)
            req("item_after_recaption", "GET", "/collections/test/items/my-noise")
            req("delete", "DELETE", M + "/my-noise", headers=AUTH)
            req("delete_again", "DELETE", M + "/my-noise", headers=AUTH)
            req("similar_deleted", "POST", "/search/similar", json={"image_id": "my-noise"})
            req("collections_after_writes", "GET", "/collections")
            req("readyz_after_writes", "GET", "/readyz")
            req("upload_unknown_collection", "POST", "/collections/nope/media", files={"file": ("n.png", new, "image/png")}, headers=AUTH)
            req("metrics_series", "GET", "/metrics")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the answers here (JSON)")
    ap.add_argument("--compare", type=Path, help="compare with answers written before; exit 1 on a difference")
    args = ap.parse_args()
    answers = run()
    text = json.dumps(answers, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text)
    if args.compare:
        before = {a["name"]: a for a in json.loads(args.compare.read_text())}
        diffs = [a["name"] for a in answers if before.get(a["name"]) != a]
        diffs += [n for n in before if n not in {a["name"] for a in answers}]
        for name in diffs:
            print(f"DIFFERENT {name}:\n  before {json.dumps(before.get(name))}\n  after  "
                  f"{json.dumps(next((a for a in answers if a['name'] == name), None))}", file=sys.stderr)
        print(json.dumps({"requests": len(answers), "different": diffs}))
        return 1 if diffs else 0
    if not args.out:
        print(text)
    print(f"{len(answers)} requests recorded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
