"""Tests for clipsearch.images.decode_image and the offline prepare stage (synthetic data only)."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.images import (MAX_IMAGE_PIXELS, ImageDecodeError, decode_image,
                               decode_image_with_mode)
from offline.data import DataError, detect_layout, prepare, read_split

# --------------------------------------------------------------------------------------------
# Image fixtures


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_ihdr(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (bomb stand-in, ~60 bytes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _jpeg_rgb(color=(200, 30, 30), size=(8, 6)) -> bytes:
    return _bytes(Image.new("RGB", size, color), "JPEG", quality=95)


def _exif_rotated_jpeg() -> bytes:
    # 8 wide x 4 tall, left half red; orientation 6 means "rotate 90 degrees clockwise to view".
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, :4] = (255, 0, 0)
    arr[:, 4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _bytes(Image.fromarray(arr), "JPEG", exif=exif, quality=95)


def _p_with_transparency() -> bytes:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    im.putpixel((0, 0), 1)
    return _bytes(im, "PNG", transparency=0)


def _png16(values=(0, 32768, 65535)) -> bytes:
    return _bytes(Image.fromarray(np.array([values], dtype=np.uint16)), "PNG")


GOOD_IMAGES = {
    "rgb": lambda: _jpeg_rgb(),
    "gray": lambda: _bytes(Image.new("L", (6, 6), 77), "PNG"),
    "rgba": lambda: _bytes(Image.new("RGBA", (5, 5), (0, 0, 255, 0)), "PNG"),
    "palette": _p_with_transparency,
    "cmyk": lambda: _bytes(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG"),
    "png16": _png16,
    "exif": _exif_rotated_jpeg,
}


# --------------------------------------------------------------------------------------------
# decode_image


def test_rgb_passthrough_and_path_input(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg_rgb(size=(10, 7)))
    for src in (p, str(p), p.read_bytes(), bytearray(p.read_bytes())):
        im = decode_image(src)
        assert im.mode == "RGB" and im.size == (10, 7)


@pytest.mark.parametrize("mode,fill", [("L", 90), ("1", 1), ("I", 1000), ("F", 0.5),
                                       ("CMYK", (0, 0, 0, 0)), ("LA", (50, 255))])
def test_modes_convert_to_rgb(mode, fill):
    im = Image.new(mode, (3, 3), fill)
    fmt = {"I": "TIFF", "F": "TIFF", "CMYK": "TIFF", "LA": "PNG"}.get(mode, "PNG")
    out, orig = decode_image_with_mode(_bytes(im, fmt))
    assert out.mode == "RGB" and out.size == (3, 3)
    assert orig == mode


def test_alpha_composited_on_white():
    out = decode_image(_bytes(Image.new("RGBA", (2, 2), (0, 0, 255, 0)), "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    half = decode_image(_bytes(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG"))
    assert 120 <= half.getpixel((0, 0))[0] <= 135


def test_palette_transparency():
    out, mode = decode_image_with_mode(_p_with_transparency())
    assert mode == "P"
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent index -> white
    assert out.getpixel((0, 0)) == (10, 200, 10)


def test_16bit_scaled_to_8bit():
    out, mode = decode_image_with_mode(_png16())
    assert mode.startswith("I")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_applied():
    out = decode_image(_exif_rotated_jpeg())
    assert out.size == (4, 8)  # rotated to portrait
    top, bottom = out.getpixel((2, 0)), out.getpixel((2, 7))
    assert top[0] > 200 and top[2] < 60      # red half ends up on top after a CW turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_first_frame():
    frames = [Image.new("P", (4, 4), i) for i in range(3)]
    for i, f in enumerate(frames):
        f.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert decode_image(data).getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_jpeg_colour():
    r, g, b = decode_image(GOOD_IMAGES["cmyk"]()).getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _bytes(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]   # header intact, scan data cut


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty"),
    (b"this is not an image at all", "not a recognised image"),
    (_jpeg_rgb(size=(64, 64))[:200], "not a recognised image"),
    (_truncated_jpeg(), "truncated"),
], ids=["empty", "text", "header-cut", "scan-cut"])
def test_bad_inputs(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment):
        decode_image(data)


def test_bomb_rejected_before_decoding():
    data = _png_with_ihdr(30000, 30000)
    assert 30000 * 30000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_with_ihdr(100, 100), max_pixels=50 * 50)


def test_pil_bomb_error_and_warning_are_errors():
    # With our own limit out of the way PIL's guards must still turn into ImageDecodeError.
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_with_ihdr(20000, 20000), max_pixels=10**12)       # > 2x PIL limit
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_with_ihdr(10000, 10000), max_pixels=10**12)       # warning band


def test_messages_have_no_paths_and_files_are_closed(tmp_path):
    bad = tmp_path / "secret_dir" / "x.jpg"
    bad.parent.mkdir()
    bad.write_bytes(_truncated_jpeg())
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for src in (bad, bad.read_bytes(), tmp_path / "nope.jpg"):
            with pytest.raises(ImageDecodeError) as ei:
                decode_image(src)
            assert "secret_dir" not in str(ei.value) and str(tmp_path) not in str(ei.value)
        decode_image(GOOD_IMAGES["rgb"]())
    assert len(os.listdir("/proc/self/fd")) <= fds_before


# --------------------------------------------------------------------------------------------
# Synthetic datasets

GOOD = [f"good{i}.jpg" for i in range(10)]
ODD = {"gray.png": "gray", "rgba.png": "rgba", "pal.png": "palette", "cmyk.jpg": "cmyk",
       "deep.png": "png16", "rot.jpg": "exif"}
CORRUPT = {"corrupt.jpg": b"\xff\xd8garbage" * 10, "trunc.jpg": _truncated_jpeg(),
           "zero.jpg": b""}
STRAY = "stray_000.jpg.1"
MISSING = "missing.jpg"


def _captions() -> list[tuple[str, str]]:
    """(image, caption) rows in file order, including every kind of bad item."""
    rows = []
    for name in GOOD + list(ODD):
        rows += [(name, f"A photo of {name}, number {k} .") for k in range(3)]
    rows[1] = (rows[1][0], "   ")                          # empty caption on good0 #1
    rows[5] = (rows[5][0], "a  PHOTO of good1.jpg, number 0 .")  # duplicate of good1 #0 (#2)
    for name in CORRUPT:
        rows += [(name, f"caption for {name}")] * 1 + [(name, f"another for {name}")]
    rows += [(MISSING, "nothing here"), (STRAY, "stray one"), (STRAY, "stray two")]
    return rows


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate(GOOD):
        (folder / name).write_bytes(_jpeg_rgb(color=(i * 20, 100, 50)))
    for name, kind in ODD.items():
        (folder / name).write_bytes(GOOD_IMAGES[kind]())
    for name, data in CORRUPT.items():
        (folder / name).write_bytes(data)
    (folder / "uncaptioned.jpg").write_bytes(_jpeg_rgb())


def _write_lists(folder: Path) -> None:
    usable = GOOD + list(ODD)
    lists = {"train": usable[:10] + ["corrupt.jpg"], "dev": usable[10:13] + [MISSING],
             "test": usable[13:15]}  # usable[15] ("rot.jpg") is in no list
    for s, names in lists.items():
        (folder / f"Flickr_8k.{s}Images.txt").write_text("\n".join(names) + "\n")


def make_original(root: Path, with_lists: bool = True) -> Path:
    _write_images(root / "Flicker8k_Dataset")
    text = root / "Flickr8k_text"
    text.mkdir()
    counters: dict[str, int] = {}
    lines = []
    for name, cap in _captions():
        k = counters.get(name, 0)
        counters[name] = k + 1
        lines.append(f"{name}#{k}\t{cap}")
    lines.insert(3, "a malformed line without a tab")
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    if with_lists:
        _write_lists(text)
    return root


def make_kaggle(root: Path, with_lists: bool = False) -> Path:
    _write_images(root / "Images")
    with open(root / "captions.txt", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(_captions())
    if with_lists:
        _write_lists(root)
    return root


def _report(out: Path) -> dict:
    return json.loads((out / "validation_report.json").read_text())


def _reasons(report: dict) -> dict[str, list[str]]:
    got: dict[str, list[str]] = {}
    for item in report["skipped"]:
        got.setdefault(item["reason"], []).append(item.get("caption_id") or item.get("image_id")
                                                 or item["where"])
    return {k: sorted(v) for k, v in got.items()}


def _all_ids(out: Path) -> dict[str, list[dict]]:
    return {s: read_split(out / "splits" / f"{s}.jsonl") for s in ("train", "val", "test")}


N_USABLE = len(GOOD) + len(ODD)                 # 16 images
N_KEPT_CAPTIONS = N_USABLE * 3 - 1              # minus one empty (the repeated caption is kept)


def test_detect_layout(tmp_path):
    assert detect_layout(make_original(tmp_path / "o")) == "original"
    assert detect_layout(make_kaggle(tmp_path / "k")) == "kaggle"
    g = tmp_path / "g.csv"
    g.write_text("image,caption\n")
    assert detect_layout(g) == "generic"
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Unrecognised"):
        detect_layout(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError):
        detect_layout(tmp_path / "notes.txt")


def test_original_official(tmp_path, capsys):
    data = make_original(tmp_path / "data")
    out = tmp_path / "out"
    res = prepare(data, out, split="official")
    assert not res["up_to_date"]
    rep = _report(out)
    assert _reasons(rep) == {
        "bad_image_id": [STRAY],
        "corrupt_image": sorted(CORRUPT),
        "empty_caption": ["good0.jpg#1"],
        "malformed_record": ["Flickr8k.token.txt:4"],
        "missing_image": [MISSING],
    }
    by_id = {i.get("image_id"): i for i in rep["skipped"]}
    assert by_id[STRAY]["captions_dropped"] == 2
    # a caption repeating another of the same image is a real annotation: kept, and noted
    assert [(n["reason"], n["caption_id"]) for n in rep["notes"]] == [("duplicate_caption", "good1.jpg#2")]
    assert rep["counts"]["notes_by_reason"] == {"duplicate_caption": 1}
    assert "0 bytes" in by_id["zero.jpg"]["detail"]
    c = rep["counts"]
    assert c["caption_records"] == len(_captions()) + 1
    assert c["captions_kept"] == N_KEPT_CAPTIONS
    assert c["images_referenced"] == N_USABLE + len(CORRUPT) + 2
    assert c["images_kept"] == N_USABLE
    assert c["image_modes"] == {"RGB": 11, "L": 1, "RGBA": 1, "P": 1, "CMYK": 1, "I;16": 1}
    assert rep["images_without_captions"] == ["uncaptioned.jpg"]
    assert rep["unassigned_images"] == ["rot.jpg"]
    assert rep["split_list_entries_not_usable"] == {"train": ["corrupt.jpg"], "val": [MISSING],
                                                    "test": []}
    assert res["counts"] == {"train": {"images": 10, "captions": 29},
                             "val": {"images": 3, "captions": 9},
                             "test": {"images": 2, "captions": 6}}
    splits = _all_ids(out)
    rec = splits["train"][0]
    assert set(rec) == {"image_id", "image_path", "caption_id", "caption"}
    assert rec["image_id"] == "good0.jpg" and rec["caption_id"] == "good0.jpg#0"
    assert Path(rec["image_path"]).is_absolute() and Path(rec["image_path"]).is_file()
    assert rec["caption"] == "A photo of good0.jpg, number 0 ."
    dup_img = [r for r in splits["train"] if r["image_id"] == "good1.jpg"]
    assert [r["caption_id"] for r in dup_img] == ["good1.jpg#0", "good1.jpg#1", "good1.jpg#2"]
    printed = capsys.readouterr().out
    assert "corrupt_image 3" in printed and "validation_report.json" in printed


def test_idempotent_and_force(tmp_path, capsys):
    data = make_original(tmp_path / "data")
    out = tmp_path / "out"
    first = prepare(data, out)
    mtime = (out / "splits" / "train.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    again = prepare(data, out)
    assert again["up_to_date"] and again["counts"] == first["counts"]
    assert "up to date" in capsys.readouterr().out
    assert (out / "splits" / "train.jsonl").stat().st_mtime_ns == mtime
    assert not prepare(data, out, force=True)["up_to_date"]
    # Different inputs invalidate: a changed split kind and a changed image listing.
    assert not prepare(data, out, split="random")["up_to_date"]
    assert prepare(data, out, split="random")["up_to_date"]
    (data / "Flicker8k_Dataset" / "new.jpg").write_bytes(_jpeg_rgb())
    assert not prepare(data, out, split="random")["up_to_date"]


def test_random_split_disjoint_and_deterministic(tmp_path):
    data = make_kaggle(tmp_path / "data")
    a = prepare(data, tmp_path / "a", split="random", seed=3, workers=1)
    b = prepare(data, tmp_path / "b", split="random", seed=3, workers=2)
    c = prepare(data, tmp_path / "c", split="random", seed=4)
    ia, ib, ic = (_all_ids(tmp_path / x) for x in "abc")
    assert ia == ib
    assert a["counts"] == b["counts"]
    assert {s: n["images"] for s, n in a["counts"].items()} == {"train": 11, "val": 2, "test": 3}
    imgs = {s: {r["image_id"] for r in v} for s, v in ia.items()}
    assert not (imgs["train"] & imgs["val"] or imgs["train"] & imgs["test"]
                or imgs["val"] & imgs["test"])
    assert len(set().union(*imgs.values())) == N_USABLE
    assert sum(n["captions"] for n in a["counts"].values()) == N_KEPT_CAPTIONS
    assert {s: {r["image_id"] for r in v} for s, v in ic.items()} != imgs


def test_kaggle_layout(tmp_path):
    data = make_kaggle(tmp_path / "data")
    with pytest.raises(DataError, match="official"):
        prepare(data, tmp_path / "out", split="official")
    prepare(data, tmp_path / "out", split="random")
    rep = _report(tmp_path / "out")
    assert rep["layout"] == "kaggle"
    # Same ids as the original layout, and commas inside captions survive CSV parsing.
    reasons = _reasons(rep)
    assert "duplicate_caption" not in reasons and [n["caption_id"] for n in rep["notes"]] == ["good1.jpg#2"]
    assert reasons["empty_caption"] == ["good0.jpg#1"]
    assert reasons["bad_image_id"] == [STRAY] and reasons["missing_image"] == [MISSING]
    assert rep["counts"]["captions_kept"] == N_KEPT_CAPTIONS
    recs = [r for v in _all_ids(tmp_path / "out").values() for r in v]
    assert any(r["caption"] == "A photo of good3.jpg, number 2 ." for r in recs)


def test_kaggle_uses_lists_when_present(tmp_path):
    data = make_kaggle(tmp_path / "data", with_lists=True)
    res = prepare(data, tmp_path / "out", split="official")
    assert res["counts"]["train"]["images"] == 10 and res["counts"]["test"]["images"] == 2


def test_generic_jsonl_and_csv(tmp_path):
    data = tmp_path / "corpus"
    _write_images(data / "imgs")
    absolute = str((data / "imgs" / "good2.jpg").resolve())
    recs = [{"image": "imgs/good0.jpg", "caption": "first, with a comma"},
            {"image": "imgs/good0.jpg", "caption": "second"},
            {"image": absolute, "caption": "absolute path"},
            {"image": "imgs/cmyk.jpg", "caption": "cmyk"},
            {"image": "imgs/zero.jpg", "caption": "zero bytes"},
            {"image": "imgs/nope.jpg", "caption": "missing"},
            {"image": "imgs/good0.jpg", "caption": ""}]
    jl = data / "recs.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken json\n")
    res = prepare(jl, tmp_path / "o1", split="random", ratios=(0.34, 0.33, 0.33))
    rep = _report(tmp_path / "o1")
    assert rep["layout"] == "generic"
    assert _reasons(rep) == {"corrupt_image": ["imgs/zero.jpg"], "missing_image": ["imgs/nope.jpg"],
                             "empty_caption": ["imgs/good0.jpg#2"],
                             "malformed_record": ["recs.jsonl:8"]}
    assert sum(n["images"] for n in res["counts"].values()) == 3
    assert sum(n["captions"] for n in res["counts"].values()) == 4

    cs = data / "recs.csv"
    with open(cs, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["image", "caption"])
        w.writeheader()
        w.writerows(recs)
    res2 = prepare(cs, tmp_path / "o2", split="random", ratios=(0.34, 0.33, 0.33))
    assert res2["counts"] == res["counts"]
    assert _all_ids(tmp_path / "o2") == _all_ids(tmp_path / "o1")


def test_bad_arguments(tmp_path):
    data = make_original(tmp_path / "data")
    with pytest.raises(DataError, match="split"):
        prepare(data, tmp_path / "o", split="bogus")
    with pytest.raises(DataError, match="ratios"):
        prepare(data, tmp_path / "o", split="random", ratios=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "nope.jsonl")
