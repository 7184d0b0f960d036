"""GET /images/{image_id}: only ids from the served metadata map to files."""

from __future__ import annotations

import pytest


def test_serves_known_image(client, dataset):
    image_id = dataset[0][3]["image_id"]
    r = client.get(f"/images/{image_id}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    with open(dataset[0][3]["image_path"], "rb") as fh:
        assert r.content == fh.read()


def test_result_urls_resolve(client):
    hits = client.post("/search/text", json={"query": "teal", "k": 3}).json()["results"]
    for hit in hits:
        assert client.get(hit["image_url"]).status_code == 200


@pytest.mark.parametrize("path", [
    "/images/..%2F..%2Fetc%2Fpasswd",
    "/images/../../etc/passwd",
    "/images/%2Fetc%2Fpasswd",
    "/images//etc/passwd",
    "/images/..%252F..%252Fetc%252Fpasswd",
    "/images/00_solid_red.png%00.txt",
    "/images/00_SOLID_RED.PNG",
    "/images/",
    "/images/conftest.py",
])
def test_unknown_ids_and_traversal_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert "root:" not in r.text


def test_images_dir_override(make_client, dataset, fakes, tmp_path):
    moved = tmp_path / "mounted-images"
    moved.mkdir()
    (moved / dataset[0][0]["image_id"]).write_bytes(b"\x89PNG moved copy")
    resources = fakes.fake_resources(dataset, images_dir=moved)
    client = make_client(resources=resources)
    r = client.get(f"/images/{dataset[0][0]['image_id']}")
    assert r.status_code == 200 and r.content == b"\x89PNG moved copy"
    # known id, but its file is not in the override folder
    r = client.get(f"/images/{dataset[0][1]['image_id']}")
    assert r.status_code == 404 and r.json()["error"]["message"] == "image file not available on this server"


def test_ids_with_slashes_round_trip(make_client, dataset, fakes):
    """The generic dataset layout may use paths as ids; image_url must still resolve."""
    images, texts = dataset
    renamed = ([{**r, "image_id": "nested/dir/" + r["image_id"]} for r in images],
               [{**t, "image_id": "nested/dir/" + t["image_id"]} for t in texts])
    client = make_client(resources=fakes.fake_resources(renamed))
    hit = client.post("/search/text", json={"query": "red", "k": 1}).json()["results"][0]
    assert hit["image_id"] == "nested/dir/00_solid_red.png"
    assert hit["image_url"] == "/images/nested%2Fdir%2F00_solid_red.png"
    assert hit["captions"]
    assert client.get(hit["image_url"]).status_code == 200
    assert client.get("/images/nested/dir/00_solid_red.png").status_code == 200
    assert client.get("/images/nested/00_solid_red.png").status_code == 404
