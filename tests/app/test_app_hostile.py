"""Hostile uploads and hostile text: each gets a clear 4xx in the error shape or a correct result.

Complements test_app_validation.py (empty, text-as-jpg, truncated JPEG, corrupt PNG, 10k x 10k bomb,
size caps, k range, missing fields, content types): the image kinds a real user or attacker sends
(animated, CMYK, 16-bit, palette with alpha, EXIF-rotated, declared-huge headers) and text that is
long, binary, invisible or in other scripts, against the fake encoder and the real tiny model.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from clipsearch.images import decode_image

ERROR_CODES = {"bad_request", "invalid_request", "invalid_image", "payload_too_large",
               "unsupported_media_type"}


def assert_clear_4xx(r, status: int | None = None, code: str | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] in ERROR_CODES and err["message"].strip()
    assert "Traceback" not in r.text and "/tmp" not in r.text and "site-packages" not in r.text
    if code is not None:
        assert err["code"] == code, err
    return err


# --- image builders -------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int, bit_depth: int = 8, color_type: int = 2,
                 rows: bytes | None = None) -> bytes:
    """A PNG whose header declares `width` x `height`; the data is tiny (or `rows`, if given)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def rgb16_png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG of one colour, which PIL cannot write itself."""
    pixel = b"".join(struct.pack(">H", c * 257) for c in rgb)
    rows = b"".join(b"\x00" + pixel * size for _ in range(size))
    return declared_png(size, size, bit_depth=16, color_type=2, rows=rows)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def animated_gif(first: tuple[int, int, int], second: tuple[int, int, int]) -> bytes:
    frames = [Image.new("RGB", (32, 32), first), Image.new("RGB", (32, 32), second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_alpha(colour: tuple[int, int, int]) -> bytes:
    """Left half `colour`, right half fully transparent (composited onto white when decoded)."""
    im = Image.new("P", (32, 32), 0)
    im.putpalette(list(colour) + [0, 0, 0] * 255)
    im.paste(1, (16, 0, 32, 32))
    return encode(im, "PNG", transparency=1)


def exif_rotated(upright: Image.Image, orientation: int = 6) -> bytes:
    """The pixels a camera stores for `upright` with EXIF orientation 6 (display rotated 90° CW)."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "PNG", exif=exif.tobytes())


def hits(r) -> list[tuple[str, float]]:
    """(caption id or image id, score) of a target=captions or target=images answer."""
    assert r.status_code == 200, r.text[:300]
    return [(h.get("caption_id", h["image_id"]), round(h["score"], 5)) for h in r.json()["results"]]


def upload(client, data: bytes, name: str = "q.png", k: int = 5, mime: str = "image/png", target: str | None = None):
    form = {"k": str(k), **({"target": target} if target else {})}
    return client.post("/search/image", files={"file": (name, data, mime)}, data=form)


# --- hostile uploads ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,data", [
    ("bomb-30000.png", declared_png(30_000, 30_000)),
    ("bomb-65535x1.png", declared_png(65_535, 65_535, bit_depth=1, color_type=0)),
    ("gif-screen.gif", b"GIF89a" + struct.pack("<HH", 30_000, 30_000) + b"\x00\x00\x00" + b";"),
    ("jpeg-header.jpg", b"\xff\xd8\xff\xc0\x00\x11\x08" + struct.pack(">HH", 60_000, 60_000)
     + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9"),
    ("zero-size.png", declared_png(0, 10)),
    ("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
    ("nul.jpg", b"\x00" * 4096),
], ids=["png-30000x30000", "png-1bit-65535", "gif-declared-30000", "jpeg-declared-60000", "png-0-width",
        "svg", "nul-bytes"])
def test_declared_huge_or_bogus_images_are_422_without_decoding(client, encoder, name, data):
    t0 = time.perf_counter()
    err = assert_clear_4xx(upload(client, data, name), 422, "invalid_image")
    assert time.perf_counter() - t0 < 2.0  # refused from the header, not after decoding gigapixels
    assert encoder.image_calls == 0
    if "30000" in name or "60000" in name or "65535" in name:
        assert "too large" in err["message"]


def test_animated_gif_uses_its_first_frame(client, fakes):
    data = animated_gif(fakes.PALETTE["red"], fakes.PALETTE["blue"])
    results = upload(client, data, "anim.gif", mime="image/gif", target="captions").json()["results"]
    assert results[0]["image_id"] == "00_solid_red.png"
    assert all("blue" not in h["caption"] for h in results[:2])
    images = upload(client, data, "anim.gif", mime="image/gif").json()["results"]
    assert images[0]["image_id"] == "00_solid_red.png"
    assert "02_solid_blue.png" not in [h["image_id"] for h in images[:2]]
    first_frame = decode_image(data)
    assert first_frame.getpixel((0, 0)) == first_frame.getpixel((31, 31))


def test_cmyk_jpeg(client, fakes):
    rgb = Image.new("RGB", (32, 32), fakes.PALETTE["blue"])
    data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r = upload(client, data, "cmyk.jpg", mime="image/jpeg")
    assert r.json()["results"][0]["image_id"] == "02_solid_blue.png"


def test_16_bit_grayscale_png(client):
    arr = np.full((32, 32), 128 * 257, dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    r = upload(client, data, "gray16.png")
    # mid-grey maps to the palette's gray: the gray/pink stripes are the only grey image
    assert r.json()["results"][0]["image_id"] == "08_stripes_gray_pink.png"


def test_16_bit_rgb_png(client, fakes):
    data = rgb16_png(fakes.PALETTE["green"])
    assert decode_image(data).getpixel((5, 5)) == fakes.PALETTE["green"]
    assert upload(client, data, "rgb48.png").json()["results"][0]["image_id"] == "01_solid_green.png"


def test_palette_with_alpha_composites_on_white(client, fakes):
    data = palette_with_alpha(fakes.PALETTE["red"])
    decoded = decode_image(data)
    assert decoded.getpixel((0, 0)) == fakes.PALETTE["red"] and decoded.getpixel((31, 0)) == (255, 255, 255)
    results = upload(client, data, "pal.png").json()["results"]
    assert results[0]["image_id"] == "10_stripes_red_white.png"  # red + white


def test_exif_rotated_photo_is_searched_upright(client, fakes):
    upright = fakes.image("stripes", "red", "white")
    rotated = exif_rotated(upright)
    stored = Image.open(io.BytesIO(rotated))
    no_exif = encode(stored.convert("RGB"), "PNG")
    for target in ("captions", "images"):
        upright_hits = hits(upload(client, fakes.png_bytes(upright), "upright.png", target=target))
        assert hits(upload(client, rotated, "rotated.png", target=target)) == upright_hits
        # control: the same stored pixels without the EXIF tag give a different (unrotated) answer
        assert hits(upload(client, no_exif, "raw.png", target=target)) != upright_hits


def test_exif_rotated_jpeg_and_broken_exif(client, fakes):
    upright = Image.new("RGB", (40, 20), fakes.PALETTE["orange"])
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(upright.transpose(Image.Transpose.ROTATE_270), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (40, 20)
    assert upload(client, data, "r.jpg", mime="image/jpeg").json()["results"][0]["image_id"] == \
        "05_solid_orange.png"
    # an EXIF block that is garbage costs the orientation, not the request
    broken = encode(upright, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\xff")
    assert upload(client, broken, "b.jpg", mime="image/jpeg").status_code == 200


@pytest.mark.parametrize("filename", ["../../etc/passwd", "a\x00b.png", "名前.png", "x" * 2000,
                                      "", "con.png;rm -rf /"])
def test_odd_filenames_do_not_matter(client, fakes, filename):
    data = fakes.png_bytes(fakes.image("solid", "teal"))
    r = client.post("/search/image", files={"file": (filename, data, "text/plain")})
    if r.status_code == 200:
        assert r.json()["results"]
    else:  # a part without a usable filename is not a file upload at all
        assert_clear_4xx(r, 422)


def test_upload_just_under_cap_is_fine_and_just_over_is_413(make_client, fakes):
    client = make_client(max_upload_bytes=8192)
    png = fakes.png_bytes(fakes.image("solid", "red"))
    padded = png + b"\x00" * (8192 - len(png))  # trailing bytes after IEND are ignored by decoders
    assert upload(client, padded).status_code == 200
    assert_clear_4xx(upload(client, padded + b"\x00"), 413, "payload_too_large")


# --- hostile text ---------------------------------------------------------------------------------

HOSTILE_QUERIES = {
    "control-chars": "\u0000\u0001 red \u0007\u001b[31m\u007f",
    "c0-separators-only": "\u001c\u001d\u001e\u001f",
    "emoji": "🐶🏖️ a dog 🐕‍🦺 on the beach 👩🏽‍🚀",
    "rtl-arabic": "كلب يركض على الشاطئ",
    "rtl-hebrew-mixed": "כלב red רץ",
    "bidi-override": "\u202egnp.exe\u202c red",
    "zero-width": "\u200b\u200c\u200d\ufeff",
    "combining-zalgo": "r̴̢̛e̷̡͎d̵̰͝" * 20,
    "cjk": "海滩上奔跑的狗",
    "private-use": "\ue000\U000f0000",
    "replacement": "\ufffd" * 50,
    "max-length-emoji": "😀" * 1000,
    "max-length-ascii": "a" * 1000,
    "json-escapes": "\\\" </script> ' ; DROP TABLE images; --",
}


@pytest.mark.parametrize("query", HOSTILE_QUERIES.values(), ids=list(HOSTILE_QUERIES))
def test_hostile_text_gets_a_result(client, query):
    r = client.post("/search/text", json={"query": query, "k": 3})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["results"]) == 3


@pytest.mark.parametrize("query,reason", [
    ("\u0085\u00a0\u2028\u3000\u1680", "whitespace"),
    ("x" * 100_000, "100k"),
    ("😀" * 1001, "1001 emoji"),
], ids=["unicode-whitespace-only", "100k-chars", "over-limit-emoji"])
def test_hostile_text_rejected(client, query, reason):
    r = client.post("/search/text", json={"query": query})
    assert_clear_4xx(r)
    assert r.status_code in (413, 422)


def test_100k_character_body_is_refused_by_size_before_parsing(client):
    r = client.post("/search/text", content=json.dumps({"query": "é" * 100_000}).encode(),
                    headers={"content-type": "application/json"})
    assert_clear_4xx(r, 413, "payload_too_large")


def test_100k_characters_accepted_when_configured(make_client):
    client = make_client(max_query_chars=100_000)
    r = client.post("/search/text", content=json.dumps({"query": "😀" * 100_000}).encode(),  # ASCII-escaped
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert_clear_4xx(client.post("/search/text", json={"query": "a" * 100_001}), 422, "invalid_request")


@pytest.mark.parametrize("body", [
    b'{"query": "\xff\xfe red"}',
    b'{"query": "caf\xe9"}',
    b"[" * 20_000 + b"]" * 20_000,
    b'{"query": "red", "k": 1' + b"0" * 5000 + b"}",
], ids=["invalid-utf8", "latin-1", "deep-nesting", "5000-digit-k"])
def test_unparsable_bodies_are_400(client, body):
    err = assert_clear_4xx(client.post("/search/text", content=body,
                                       headers={"content-type": "application/json"}), 400, "bad_request")
    assert "could not be parsed" in err["message"]


@pytest.mark.parametrize("payload", [
    {"query": "\ud800 lone surrogate"},
    {"query": "red", "k": 1e400},
    {"query": "red", "k": -1},
    {"query": "red", "k": 2 ** 63},
    {"query": "red", "k": [3]},
    {"query": {"text": "red"}},
    {"query": "red", "extra": None},
    {},
], ids=["lone-surrogate", "k-inf", "k-negative", "k-2^63", "k-list", "query-object", "extra-null",
        "empty-object"])
def test_more_invalid_payloads_are_422(client, payload):
    body = json.dumps(payload, allow_nan=True).replace("Infinity", "1e400").encode()
    r = client.post("/search/text", content=body, headers={"content-type": "application/json"})
    assert_clear_4xx(r, 422, "invalid_request")


def test_utf8_encoded_surrogate_is_422(client):
    # Python's JSON decoder lets an encoded surrogate through; the string check refuses it
    r = client.post("/search/text", content=b'{"query": "\xed\xa0\x80"}',
                    headers={"content-type": "application/json"})
    assert_clear_4xx(r, 422, "invalid_request")


def test_whole_float_k_is_an_integer(client):
    r = client.post("/search/text", json={"query": "red", "k": 3.0})
    assert r.status_code == 200 and r.json()["k"] == 3 and len(r.json()["results"]) == 3


def test_text_in_other_encodings_and_charsets(client):
    # RFC 8259 JSON is UTF-8; a UTF-16 body with a BOM is still decoded, a charset parameter ignored
    utf16 = json.dumps({"query": "red"}).encode("utf-16")
    assert client.post("/search/text", content=utf16,
                       headers={"content-type": "application/json"}).status_code == 200
    r = client.post("/search/text", content=b'{"query": "red"}',
                    headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 200


def test_hostile_text_with_the_real_tokenizer(make_client, tiny_artifacts):
    """The real open_clip tokenizer and text tower (tiny model) take every accepted hostile query."""
    client = make_client(resources=None, artifacts_dir=tiny_artifacts)
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)
    for name, query in HOSTILE_QUERIES.items():
        r = client.post("/search/text", json={"query": query, "k": 2})
        assert r.status_code == 200, (name, r.text[:300])
        assert all(np.isfinite(h["score"]) for h in r.json()["results"]), name
