"""Collections over HTTP: image → image, filters, pagination, min_score, /search/similar, captions with
the hubness correction, thumbnails, several collections at once (fake encoder, every expected answer
computed by brute force over the fake vectors), and start-up over on-disk collections of the real
tiny model."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import Catalog, FaissStore, NewItem

from app.resources import make_resources
from app.schemas import MAX_FILTER_FIELDS

# --- brute force over the fake vectors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bf(dataset, fakes) -> SimpleNamespace:
    """The fake collection's vectors, ids and metadata, for computing every expected answer."""
    images, texts = dataset
    enc = fakes.ColorEncoder()
    return SimpleNamespace(
        enc=enc,
        ids=[r["image_id"] for r in images],
        paths=[r["image_path"] for r in images],
        img=enc.encode_images([Image.open(r["image_path"]) for r in images]),
        txt=enc.encode_texts([t["caption"] for t in texts]),
        cap_ids=[t["caption_id"] for t in texts],
        cap_texts=[t["caption"] for t in texts],
        cap_image=[t["image_id"] for t in texts],
        meta=[{"kind": r["image_id"].split("_")[1], "index": i} for i, r in enumerate(images)],
    )


def _key(value: Any) -> tuple[str, Any]:
    # how the store compares metadata: numbers by value, booleans and strings as such
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value))
    return ("s", value)


def _matches(meta: dict, flt: dict | None) -> bool:
    if not flt:
        return True
    for name, wanted in flt.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if name not in meta or _key(meta[name]) not in {_key(v) for v in values}:
            return False
    return True


def expected_images(bf, query_vec: np.ndarray, k: int, offset: int = 0, flt: dict | None = None,
                    min_score: float | None = None, exclude: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    scores = bf.img @ query_vec
    order = [i for i in np.argsort(-scores, kind="stable")
             if _matches(bf.meta[i], flt) and bf.ids[i] not in exclude]
    page = [(bf.ids[i], float(scores[i])) for i in order[offset:offset + k]]
    return [p for p in page if min_score is None or p[1] >= min_score]


def expected_captions(bf, query_vec: np.ndarray, k: int, offset: int = 0, offsets: np.ndarray | None = None,
                      flt: dict | None = None, min_score: float | None = None) -> list[tuple[str, float, float]]:
    cos = bf.txt @ query_vec
    score = cos + (offsets if offsets is not None else 0)
    meta = dict(zip(bf.ids, bf.meta))
    order = [j for j in np.argsort(-score, kind="stable") if _matches(meta[bf.cap_image[j]], flt)]
    page = [(bf.cap_ids[j], float(score[j]), float(cos[j])) for j in order[offset:offset + k]]
    return [p for p in page if min_score is None or p[1] >= min_score]


def got_images(r) -> list[tuple[str, float]]:
    assert r.status_code == 200, r.text[:500]
    return [(h["image_id"], h["score"]) for h in r.json()["results"]]


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], abs=1e-5)


def text(client, query: str, **body):
    return client.post("/search/text", json={"query": query, **body})


def image(client, data: bytes, **form):
    return client.post("/search/image", files={"file": ("q.png", data, "image/png")},
                       data={k: (json.dumps(v) if k == "filter" else str(v)) for k, v in form.items()})


def file_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


# --- image -> image -----------------------------------------------------------------------------------


def test_every_image_finds_itself_first_and_each_image_once(client, bf):
    for i, image_id in enumerate(bf.ids):
        r = image(client, file_bytes(bf.paths[i]), k=12)
        body = r.json()
        assert body["target"] == "images" and body["collection"] == "test"
        hits = got_images(r)
        assert hits[0][0] == image_id and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        assert len({h[0] for h in hits}) == len(hits) == 12  # every image, each once
        assert_same(hits, expected_images(bf, bf.img[i], 12))
        assert [h["rank"] for h in body["results"]] == list(range(1, 13))
        assert body["results"][0]["captions"] and body["results"][0]["metadata"] == bf.meta[i]


# --- filters ------------------------------------------------------------------------------------------

FILTERS = [
    {"kind": "stripes"},                                 # equality
    {"kind": ["solid", "checkerboard"]},                 # one of
    {"index": [0, 3, 10, 11]},                           # numbers
    {"index": 4.0},                                      # 4.0 == 4
    {"kind": "solid", "index": [1, 2, 9]},               # every field must match (9 is a pattern)
    {"kind": ["stripes"], "index": [8, 10, 11]},
]


@pytest.mark.parametrize("flt", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filters_match_brute_force(client, bf, flt):
    want = expected_images(bf, bf.enc.text_vector("red"), 12, flt=flt)
    assert want, "every filter here leaves something"
    r = text(client, "red", k=12, filter=flt)
    assert_same(got_images(r), want)
    assert all(_matches(h["metadata"], flt) for h in r.json()["results"])
    # the same filter on an image search (a JSON form field) and on more-like-this
    data = file_bytes(bf.paths[5])
    assert_same(got_images(image(client, data, k=12, filter=flt)), expected_images(bf, bf.img[5], 12, flt=flt))
    assert_same(got_images(client.post("/search/similar", json={"image_id": bf.ids[5], "k": 12, "filter": flt})),
                expected_images(bf, bf.img[5], 12, flt=flt, exclude=(bf.ids[5],)))
    caps = image(client, data, k=40, target="captions", filter=flt).json()["results"]
    assert_same([(h["caption_id"], h["score"], h["cosine"]) for h in caps],
                expected_captions(bf, bf.img[5], 40, flt=flt))


@pytest.mark.parametrize("flt", [{"colour": "red"}, {"kind": "polka-dots"}, {"index": 99},
                                 {"index": True}, {"kind": "solid", "index": 9}],
                         ids=["unknown-field", "unknown-value", "no-such-number", "boolean-is-no-number",
                              "fields-disagree"])
def test_filter_that_matches_nothing_is_empty(client, bf, flt):
    assert got_images(text(client, "red", filter=flt)) == []
    assert got_images(image(client, file_bytes(bf.paths[0]), filter=flt)) == []
    assert got_images(image(client, file_bytes(bf.paths[0]), filter=flt, target="captions")) == []
    assert got_images(client.post("/search/similar", json={"image_id": bf.ids[0], "filter": flt})) == []


BAD_FILTERS = {
    "nested-object": {"kind": {"$ne": "solid"}},
    "list-of-objects": {"kind": [{"a": 1}]},
    "nested-list": {"kind": [["solid"]]},
    "null": {"kind": None},
    "empty-list": {"kind": []},
    "too-many-fields": {f"field{i}": i for i in range(MAX_FILTER_FIELDS + 1)},
    "too-many-values": {"index": list(range(101))},
    "long-value": {"kind": "x" * 257},
    "empty-field-name": {"": "solid"},
    "long-field-name": {"f" * 65: "solid"},
    "not-an-object": ["kind", "solid"],
    "a-string": "kind=solid",
    "nan": {"index": float("nan")},
}


@pytest.mark.parametrize("name", BAD_FILTERS)
def test_bad_filters_are_422(client, bf, name):
    flt = BAD_FILTERS[name]
    body = json.dumps({"query": "red", "filter": flt})  # NaN goes out as the non-JSON token NaN
    r = client.post("/search/text", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text[:300]
    r = client.post("/search/similar", content=json.dumps({"image_id": bf.ids[0], "filter": flt}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text[:300]
    r = image(client, file_bytes(bf.paths[0]), filter=flt)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text[:300]


def test_sixteen_filter_fields_are_fine(client):
    flt = {f"field{i}": i for i in range(MAX_FILTER_FIELDS)}
    assert got_images(text(client, "red", filter=flt)) == []  # no item has these fields


@pytest.mark.parametrize("raw", ["{", "kind=solid", "[1]", '"solid"', "1", '{"kind": {"a": 1}}'])
def test_image_form_filter_must_be_a_json_object(client, bf, raw):
    r = client.post("/search/image", files={"file": ("q.png", file_bytes(bf.paths[0]), "image/png")},
                    data={"filter": raw})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "filter" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", ["", "  ", "null", "{}"])
def test_image_form_filter_absent_forms(client, bf, raw):
    r = client.post("/search/image", files={"file": ("q.png", file_bytes(bf.paths[0]), "image/png")},
                    data={"filter": raw, "k": "12"})
    assert_same(got_images(r), expected_images(bf, bf.img[0], 12))


# --- pagination and min_score --------------------------------------------------------------------------


@pytest.mark.parametrize("flt", [None, {"kind": ["solid", "stripes"]}], ids=["all", "filtered"])
def test_pages_concatenate_to_the_unpaginated_list(client, bf, flt):
    query = "orange and teal with some pink"
    extra = {"filter": flt} if flt else {}
    whole = text(client, query, k=12, **extra).json()["results"]
    assert_same([(h["image_id"], h["score"]) for h in whole], expected_images(bf, bf.enc.text_vector(query), 12, flt=flt))
    pages = []
    for offset in range(0, 15, 3):
        body = text(client, query, k=3, offset=offset, **extra).json()
        assert body["offset"] == offset and body["k"] == 3
        assert [h["rank"] for h in body["results"]] == list(range(offset + 1, offset + 1 + len(body["results"])))
        pages += body["results"]
    assert pages == whole  # same hits, same scores, ranks continuing across pages
    # the same for image -> image, image -> captions and more-like-this
    data = file_bytes(bf.paths[2])
    for form, n in (({}, 12), ({"target": "captions"}, 33)):
        whole = image(client, data, k=n, **form, **extra).json()["results"]
        pages = [h for off in range(0, n + 5, 5) for h in image(client, data, k=5, offset=off, **form, **extra)
                 .json()["results"]]
        assert pages == whole and [h["rank"] for h in pages] == list(range(1, len(whole) + 1))
    whole = client.post("/search/similar", json={"image_id": bf.ids[2], "k": 11, **extra}).json()["results"]
    pages = [h for off in range(0, 12, 4) for h in client.post(
        "/search/similar", json={"image_id": bf.ids[2], "k": 4, "offset": off, **extra}).json()["results"]]
    assert pages == whole and bf.ids[2] not in [h["image_id"] for h in pages]


def test_offset_past_the_end_and_over_the_limit(make_client, bf):
    client = make_client(max_offset=20)
    assert got_images(text(client, "red", offset=12)) == []
    assert len(got_images(text(client, "red", k=5, offset=10))) == 2  # the last two of 12
    assert_same(got_images(text(client, "red", k=5, offset=10)), expected_images(bf, bf.enc.text_vector("red"), 5, 10))
    assert got_images(text(client, "red", offset=20)) == []
    for r in (text(client, "red", offset=21), text(client, "red", offset=-1),
              image(client, file_bytes(bf.paths[0]), offset=21),
              client.post("/search/similar", json={"image_id": bf.ids[0], "offset": 21})):
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TextSearchRequest"]
    assert schema["properties"]["offset"]["maximum"] == 20


def test_min_score_cuts_the_ranking(client, bf):
    query = "red and white"
    qv = bf.enc.text_vector(query)
    ranking = expected_images(bf, qv, 12)
    for cut in (ranking[0][1] + 0.01, ranking[2][1], (ranking[4][1] + ranking[5][1]) / 2, -1.0):
        want = expected_images(bf, qv, 12, min_score=cut)
        got = got_images(text(client, query, k=12, min_score=cut))
        assert_same(got, want)
        assert all(s >= cut for _, s in got)
        # with a page: the cut applies within the page
        assert_same(got_images(text(client, query, k=3, offset=2, min_score=cut)),
                    expected_images(bf, qv, 3, offset=2, min_score=cut))
        data = file_bytes(bf.paths[10])
        assert_same(got_images(image(client, data, k=12, min_score=cut)),
                    expected_images(bf, bf.img[10], 12, min_score=cut))
    assert got_images(text(client, query, min_score=2)) == []
    for bad in (2.5, -3, "high", True):
        r = text(client, query, min_score=bad)
        assert r.status_code == 422, (bad, r.text)


def test_search_options_are_part_of_the_cache_key(client, encoder):
    base = text(client, "green", k=3).json()
    assert base["cached"] is False
    for extra in ({"offset": 1}, {"min_score": 0.1}, {"filter": {"kind": "solid"}}, {"collection": "test"}):
        assert text(client, "green", k=3, **extra).json()["cached"] is (extra == {"collection": "test"})
    assert text(client, "green", k=3, filter={"kind": "solid"}).json()["cached"] is True


# --- more like this --------------------------------------------------------------------------------------


def test_similar_is_brute_force_without_the_item_itself(client, bf):
    for i, image_id in enumerate(bf.ids):
        r = client.post("/search/similar", json={"image_id": image_id, "k": 12})
        body = r.json()
        assert set(body) == {"results", "k", "offset", "collection", "took_ms", "cached"}
        hits = got_images(r)
        assert image_id not in [h[0] for h in hits] and len(hits) == 11
        assert_same(hits, expected_images(bf, bf.img[i], 12, exclude=(image_id,)))
    # a checkerboard is more like the other checkerboard and its own colours than like stripes
    top = got_images(client.post("/search/similar", json={"image_id": "09_checkerboard_brown_teal.png", "k": 1}))
    assert_same(top, expected_images(bf, bf.img[9], 1, exclude=(bf.ids[9],)))


def test_similar_unknown_id_or_collection_is_404(client, bf):
    for body, message in (({"image_id": "nope.png"}, "unknown image id"),
                          ({"image_id": bf.ids[0], "collection": "nope"}, "unknown collection"),
                          ({"image_id": bf.ids[0].upper()}, "unknown image id")):
        r = client.post("/search/similar", json=body)
        assert r.status_code == 404 and r.json()["error"] == {"code": "not_found", "message": message}
    r = client.post("/search/similar", json={"image_id": ""})
    assert r.status_code == 422


# --- image -> captions, hubness-corrected -----------------------------------------------------------------


def test_captions_keep_the_hubness_corrected_ranking_across_pages_and_cuts(make_client, dataset, fakes, bf):
    rng = np.random.default_rng(7)
    offsets = -rng.uniform(0, 0.3, len(bf.cap_ids)).astype(np.float32)  # hubs pay, as beta * r_c
    hub = {"beta": 0.3, "k": 5}
    client = make_client(resources=fakes.fake_resources(dataset, caption_offsets=offsets, hubness=hub))
    data = file_bytes(bf.paths[11])
    qv = bf.img[11]
    whole = image(client, data, k=33, target="captions").json()["results"]
    want = expected_captions(bf, qv, 33, offsets=offsets)
    assert_same([(h["caption_id"], h["score"], h["cosine"]) for h in whole], want)
    assert [c[0] for c in want] != [c[0] for c in expected_captions(bf, qv, 33)]  # the offsets matter
    assert all(h["caption"] == bf.cap_texts[bf.cap_ids.index(h["caption_id"])] for h in whole)
    pages = [h for off in range(0, 35, 7) for h in image(client, data, k=7, offset=off, target="captions")
             .json()["results"]]
    assert pages == whole
    cut = want[10][1]
    got = image(client, data, k=33, target="captions", min_score=cut).json()["results"]
    assert_same([(h["caption_id"], h["score"], h["cosine"]) for h in got],
                expected_captions(bf, qv, 33, offsets=offsets, min_score=cut))
    assert len(got) == 11  # min_score applies to the corrected score
    flt = {"kind": "stripes"}
    got = image(client, data, k=33, target="captions", filter=flt).json()["results"]
    assert_same([(h["caption_id"], h["score"], h["cosine"]) for h in got],
                expected_captions(bf, qv, 33, offsets=offsets, flt=flt))
    # image hits are not corrected: images carry no offsets
    assert_same(got_images(image(client, data, k=12)), expected_images(bf, qv, 12))


# --- thumbnails --------------------------------------------------------------------------------------------


@pytest.fixture
def media_client(make_client, dataset, fakes, tmp_path):
    """The fake collection `test` (32 px images) and a collection `big` of larger, odd and broken files."""
    folder = tmp_path / "big"
    folder.mkdir()
    wide = Image.new("RGB", (300, 200), (200, 30, 40))
    wide.paste((20, 30, 220), (150, 0, 300, 200))
    wide.save(folder / "wide.png")
    Image.new("RGB", (90, 400), (20, 160, 40)).save(folder / "tall.jpg", quality=90)
    (folder / "broken.png").write_bytes(b"this is not an image at all")
    enc = fakes.ColorEncoder()
    big = FaissStore.in_memory("big", fakes.FAKE_MODEL, enc.dim)
    rows = [("wide.png", folder / "wide.png"), ("tall.jpg", folder / "tall.jpg"),
            ("broken.png", folder / "broken.png"), ("gone.png", folder / "gone.png")]
    big.add([NewItem(name, str(path), enc.text_vector(name), metadata={"file": name}) for name, path in rows])
    res = fakes.fake_resources(dataset, stores=[fakes.fake_store(dataset), big])
    client = make_client(resources=res, thumbnail_px=64)
    client.folder = folder
    return client


def _jpeg(r) -> Image.Image:
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG"
    return im


def test_thumbnails_are_small_jpegs_with_etags(media_client, bf):
    client = media_client
    for image_id in bf.ids:
        r = client.get(f"/thumbnails/{image_id}")
        im = _jpeg(r)
        assert im.size == (32, 32)  # already under thumbnail_px: kept as it is, never enlarged
        assert r.headers["etag"].startswith('"') and r.headers["cache-control"].startswith("public")
        assert r.headers["x-content-type-options"] == "nosniff"
    wide = _jpeg(client.get("/thumbnails/wide.png", params={"collection": "big"}))
    assert wide.size == (64, 43)  # longest side thumbnail_px, aspect kept
    left, right = wide.convert("RGB").getpixel((5, 20)), wide.convert("RGB").getpixel((58, 20))
    assert left[0] > 150 and right[2] > 150  # the picture, not just a box of its size
    assert _jpeg(client.get("/thumbnails/tall.jpg?collection=big")).size == (14, 64)


def test_thumbnail_conditional_get(media_client):
    client = media_client
    first = client.get("/thumbnails/wide.png?collection=big")
    etag = first.headers["etag"]
    again = client.get("/thumbnails/wide.png?collection=big")
    assert again.headers["etag"] == etag and again.content == first.content
    for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = client.get("/thumbnails/wide.png?collection=big", headers={"If-None-Match": header})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag, header
    for header in ('"nope"', etag[:-2] + '"', ""):
        assert client.get("/thumbnails/wide.png?collection=big", headers={"If-None-Match": header}).status_code == 200
    # the same id in another collection is another thumbnail
    other = client.get("/thumbnails/00_solid_red.png")
    assert other.headers["etag"] != etag
    # a changed file gets a new thumbnail and a new ETag; the old ETag no longer matches
    time.sleep(0.01)
    Image.new("RGB", (120, 300), (250, 250, 250)).save(client.folder / "wide.png")
    changed = client.get("/thumbnails/wide.png?collection=big", headers={"If-None-Match": etag})
    assert _jpeg(changed).size == (26, 64) and changed.headers["etag"] != etag


def test_thumbnail_errors(media_client):
    client = media_client
    for path, status, code in (
        ("/thumbnails/nope.png", 404, "not_found"),
        ("/thumbnails/wide.png", 404, "not_found"),                   # not in the default collection
        ("/thumbnails/wide.png?collection=nope", 404, "not_found"),
        ("/thumbnails/gone.png?collection=big", 404, "not_found"),    # known id, file missing
        ("/thumbnails/broken.png?collection=big", 422, "invalid_image"),
        ("/thumbnails/wide.png?collection=../big", 422, "invalid_request"),
        ("/thumbnails/..%2F..%2Fetc%2Fpasswd", 404, "not_found"),
    ):
        r = client.get(path)
        assert r.status_code == status and r.json()["error"]["code"] == code, (path, r.text[:200])
        assert str(client.folder) not in r.text


# --- several collections -------------------------------------------------------------------------------


@pytest.fixture
def two(dataset, fakes) -> SimpleNamespace:
    """Collections `a` (the 12 fake images) and `b` (6 of them under other ids, with their captions; `index` is their position in b)."""
    images, texts = dataset
    picked = images[4:10]
    rename = {r["image_id"]: "two-" + r["image_id"] for r in picked}
    ds_b = ([{**r, "image_id": rename[r["image_id"]]} for r in picked],
            [{**t, "image_id": rename[t["image_id"]], "caption_id": "two-" + t["caption_id"]}
             for t in texts if t["image_id"] in rename])
    enc = fakes.ColorEncoder()
    vec_b = enc.encode_images([Image.open(r["image_path"]) for r in ds_b[0]])
    stores = [fakes.fake_store(dataset, "a"), fakes.fake_store(ds_b, "b")]
    return SimpleNamespace(ds_a=dataset, ds_b=ds_b, vec_b=vec_b, stores=stores,
                           res=fakes.fake_resources(dataset, stores=stores))


def test_collections_lists_both(make_client, two, fakes):
    client = make_client(resources=two.res)
    body = client.get("/collections").json()
    assert body["default"] == "a" and body["skipped"] == {}
    assert [c["name"] for c in body["collections"]] == ["a", "b"]
    a, b = body["collections"]
    assert (a["default"], b["default"]) == (True, False)
    assert (a["images"], a["captions"]) == (12, len(two.ds_a[1]))
    assert (b["images"], b["captions"]) == (6, len(two.ds_b[1]))
    for c in (a, b):
        assert c["model"] == fakes.FAKE_MODEL and c["index"] == {"images": "exact", "captions": "exact"}
        assert c["hubness"] is None and len(c["version"]) == 16
    assert a["metadata_fields"] == {"index": list(range(12)), "kind": ["checkerboard", "solid", "stripes"]}
    assert b["metadata_fields"] == {"index": list(range(6)), "kind": ["checkerboard", "solid", "stripes"]}
    assert a["version"] != b["version"]
    ready = client.get("/readyz").json()
    assert ready["default_collection"] == "a"
    assert ready["collections"] == {"a": {"images": 12, "captions": a["captions"]},
                                    "b": {"images": 6, "captions": b["captions"]}}
    assert (ready["images"], ready["captions"]) == (18, a["captions"] + b["captions"])


def test_each_collection_searched_by_name_and_urls_resolve(make_client, two, bf):
    client = make_client(resources=two.res)
    ids_b = [r["image_id"] for r in two.ds_b[0]]
    qv = bf.enc.text_vector("orange")
    default = text(client, "orange", k=12).json()
    named_a = text(client, "orange", k=12, collection="a").json()
    assert default["collection"] == named_a["collection"] == "a"
    assert_same(got_images(text(client, "orange", k=12)), expected_images(bf, qv, 12))
    assert [h["image_id"] for h in named_a["results"]] == [h["image_id"] for h in default["results"]]
    r = text(client, "orange", k=12, collection="b")
    assert r.json()["collection"] == "b" and r.json()["cached"] is False
    scores = two.vec_b @ qv
    order = np.argsort(-scores, kind="stable")
    assert_same(got_images(r), [(ids_b[i], float(scores[i])) for i in order])
    for hit in default["results"]:  # default collection: plain URLs
        assert hit["image_url"] == f"/images/{hit['image_id']}"
        assert hit["thumbnail_url"] == f"/thumbnails/{hit['image_id']}"
    for hit in r.json()["results"]:  # the other: ?collection=b, and the URLs resolve to its files
        assert hit["image_url"] == f"/images/{hit['image_id']}?collection=b"
        assert hit["thumbnail_url"] == f"/thumbnails/{hit['image_id']}?collection=b"
        original = hit["image_id"].removeprefix("two-")
        got = client.get(hit["image_url"])
        assert got.status_code == 200 and got.content == Path(bf.paths[bf.ids.index(original)]).read_bytes()
        assert _jpeg(client.get(hit["thumbnail_url"])).size == (32, 32)
        assert client.get(f"/images/{hit['image_id']}").status_code == 404  # not in the default one
        item = client.get(f"/collections/b/items/{hit['image_id']}").json()
        assert item["collection"] == "b" and item["image_url"] == hit["image_url"]
        assert item["captions"] == hit["captions"] and item["metadata"] == hit["metadata"]
    # image search and more-like-this in `b`
    data = file_bytes(bf.paths[7])
    hits = got_images(image(client, data, k=6, collection="b"))
    assert hits[0][0] == "two-" + bf.ids[7] and len(hits) == 6
    caps = image(client, data, k=3, collection="b", target="captions").json()
    assert caps["collection"] == "b" and all(h["caption_id"].startswith("two-") for h in caps["results"])
    assert all(h["image_url"].endswith("?collection=b") for h in caps["results"])
    similar = client.post("/search/similar", json={"image_id": "two-" + bf.ids[7], "collection": "b"}).json()
    assert similar["collection"] == "b" and len(similar["results"]) == 5
    assert client.post("/search/similar", json={"image_id": "two-" + bf.ids[7]}).status_code == 404


def test_unknown_collection_is_404_everywhere(make_client, two, bf):
    client = make_client(resources=two.res)
    data = file_bytes(bf.paths[0])
    for r in (text(client, "red", collection="nope"), image(client, data, collection="nope"),
              client.post("/search/similar", json={"image_id": bf.ids[0], "collection": "nope"}),
              client.get(f"/images/{bf.ids[0]}?collection=nope"),
              client.get(f"/thumbnails/{bf.ids[0]}?collection=nope"),
              client.get(f"/collections/nope/items/{bf.ids[0]}")):
        assert r.status_code == 404 and r.json()["error"] == {"code": "not_found", "message": "unknown collection"}
    assert client.get(f"/collections/b/items/{bf.ids[0]}").status_code == 404  # in a, not in b
    assert client.get(f"/collections/a/items/{bf.ids[0]}").status_code == 200
    # a name that could be no collection is refused as invalid before any lookup
    for r in (text(client, "red", collection="../a"), image(client, data, collection="../a"),
              client.get(f"/images/{bf.ids[0]}?collection=../a")):
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_default_collection_can_be_the_other_one(dataset, fakes, two, make_client):
    res = make_resources(fakes.ColorEncoder(), two.stores, fakes.FAKE_MODEL, default="b")
    client = make_client(resources=res)
    body = text(client, "red").json()
    assert body["collection"] == "b" and all(h["image_url"].startswith("/images/two-") for h in body["results"])
    assert all("?collection=" not in h["image_url"] for h in body["results"])
    hit = text(client, "red", collection="a").json()["results"][0]
    assert hit["image_url"].endswith("?collection=a") and client.get(hit["image_url"]).status_code == 200


# --- on disk: several collections of the real tiny model ----------------------------------------------


@pytest.fixture(scope="module")
def two_on_disk(tmp_path_factory, dataset, fakes) -> Path:
    root = tmp_path_factory.mktemp("two-collections")
    images, texts = dataset
    fakes.build_artifacts(root, dataset, name="a")
    half = {r["image_id"] for r in images[:6]}
    fakes.build_artifacts(root, (images[:6], [t for t in texts if t["image_id"] in half]), name="b")
    return root


def _wait_loaded(client, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (r := client.get("/readyz")).status_code != 200:
        if not r.json()["reason"].startswith("loading"):
            return r
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.05)
    return r


def _other_model(root: Path, name: str = "c") -> None:
    """Collection `name`: a copy of `a` that says it was embedded with other weights of the model."""
    layout = ArtifactLayout(root)
    shutil.copytree(layout.collection("a").dir, layout.collection(name).dir)
    with Catalog(layout.collection(name).catalog) as catalog:
        catalog.set_model({**catalog.model(), "pretrained": "openai"}, catalog.dim)


def test_load_serves_every_collection_found(make_client, two_on_disk, dataset):
    client = make_client(resources=None, artifacts_dir=two_on_disk)
    ready = _wait_loaded(client).json()
    assert ready["ready"] is True and ready["default_collection"] == "a"  # the first, alphabetically
    texts_b = sum(1 for t in dataset[1] if t["image_id"] in {r["image_id"] for r in dataset[0][:6]})
    assert ready["collections"] == {"a": {"images": 12, "captions": len(dataset[1])},
                                    "b": {"images": 6, "captions": texts_b}}
    listed = client.get("/collections").json()
    assert [c["name"] for c in listed["collections"]] == ["a", "b"] and listed["skipped"] == {}
    assert all(c["model"]["model"] == "test-tiny-vit" for c in listed["collections"])
    for name, n in (("a", 12), ("b", 6)):
        body = text(client, "a red square", k=20, collection=name).json()
        assert body["collection"] == name and len(body["results"]) == n
        for hit in body["results"][:2]:
            assert client.get(hit["image_url"]).status_code == 200
            assert _jpeg(client.get(hit["thumbnail_url"])).size == (32, 32)
    assert len(text(client, "a red square", k=20).json()["results"]) == 12


def test_load_named_and_default_collections(make_client, two_on_disk):
    client = make_client(resources=None, artifacts_dir=two_on_disk, collections="b")
    ready = _wait_loaded(client).json()
    assert ready["default_collection"] == "b" and list(ready["collections"]) == ["b"]
    assert text(client, "red", collection="a").status_code == 404
    client = make_client(resources=None, artifacts_dir=two_on_disk, default_collection="b")
    ready = _wait_loaded(client).json()
    assert ready["default_collection"] == "b" and list(ready["collections"]) == ["a", "b"]
    hit = text(client, "red", collection="a").json()["results"][0]
    assert hit["image_url"].endswith("?collection=a")


def test_collection_of_another_model_is_skipped_when_found_and_an_error_when_named(
        make_client, two_on_disk, tmp_path):
    root = Path(shutil.copytree(two_on_disk, tmp_path / "artifacts"))
    _other_model(root, "c")
    client = make_client(resources=None, artifacts_dir=root)
    ready = _wait_loaded(client).json()
    assert ready["ready"] is True and list(ready["collections"]) == ["a", "b"]
    skipped = client.get("/collections").json()["skipped"]
    assert skipped == {"c": "collection 'c' was embedded with test-tiny-vit/openai dim 32, the default "
                            "collection 'a' with test-tiny-vit/random-init dim 32"}
    assert text(client, "red", collection="c").status_code == 404

    named = make_client(resources=None, artifacts_dir=root, collections="a,c")
    r = _wait_loaded(named)
    assert r.status_code == 503
    assert r.json()["reason"] == f"{skipped['c']}; serve collections of one model (CLIPSEARCH_COLLECTIONS)"


# --- known store bug, kept visible -------------------------------------------------------------------


def test_rebuilt_collection_gets_a_new_version(dataset, fakes):
    images, texts = dataset
    kept = {r["image_id"] for r in images[:6]}
    full = fakes.fake_store(dataset)
    smaller = fakes.fake_store((images[:6], [t for t in texts if t["image_id"] in kept]))
    assert full.count() != smaller.count()
    assert full.version != smaller.version
