"""No HTTP answer carries a path of this server: a collection built with a local checkpoint under
ARTIFACTS_DIR (the model identity records its absolute path), served for real, and every route of the
app asked with an admin key; neither ARTIFACTS_DIR nor the images' folder shows in any body or header."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clipsearch.models import load_model

ADMIN = "paths-admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def served_root(tmp_path_factory, dataset, fakes) -> Path:
    root = tmp_path_factory.mktemp("paths") / "artifacts"
    ckpt = root / "models" / "tiny-finetuned.pt"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(load_model("test-tiny-vit", None, device="cpu").model.state_dict(), ckpt)
    return fakes.build_artifacts(root, dataset, pretrained=str(ckpt))


def test_no_answer_holds_a_server_path(make_client, served_root, dataset, fakes):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    client = make_client(resources=None, artifacts_dir=served_root, api_key=ADMIN, writes=True,
                         text_backend="torch", image_backend="torch", headers=auth)
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)
    image_id = dataset[0][0]["image_id"]
    png = fakes.png_bytes(fakes.image("solid", "red"))
    answers = [
        client.get("/readyz"), client.get("/readyz", headers={"Authorization": ""}), client.get("/healthz"),
        client.get("/collections"), client.get(f"/collections/tiny/items/{image_id}"),
        client.get("/metrics"), client.get("/openapi.json"), client.get("/"), client.get("/auth/session"),
        client.get(f"/thumbnails/{image_id}"), client.get("/images/nope.png"),
        client.post("/search/text", json={"query": "red"}), client.post("/search/text", json={"query": ""}),
        client.post("/search/image", files={"file": ("q.png", png, "image/png")}),
        client.post("/search/similar", json={"image_id": image_id}),
        client.post("/embed/text", json={"texts": ["red"]}),
        client.post("/embed/image", files={"file": ("q.png", png, "image/png")}),
        client.post("/embed/image", files={"file": ("q.png", b"not an image", "image/png")}),
        client.post("/admin/reload"), client.post("/collections/tiny/compact"),
        client.delete("/collections/tiny/media/nope"),
    ]
    ready = answers[0].json()
    assert ready["model"]["pretrained"] == "tiny-finetuned.pt"  # the file, named; sha256 identifies it
    assert client.get("/collections").json()["collections"][0]["model"]["pretrained"] == "tiny-finetuned.pt"
    assert answers[15].json()["model"]["pretrained"] == "tiny-finetuned.pt"
    server_paths = {str(served_root), str(served_root.resolve()), str(Path(dataset[0][0]["image_path"]).parent)}
    for r in answers:
        assert r.status_code < 500, (r.request.url, r.text[:300])
        text = r.content.decode("utf-8", "replace") + repr(dict(r.headers))
        leaked = [p for p in server_paths if p in text]
        assert not leaked, (r.request.url, leaked, text[:500])
