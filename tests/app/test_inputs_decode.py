"""app.inputs: base64 / data: URI images, query vectors and weighted term sums (no HTTP)."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest

import app.inputs as inputs
from app.inputs import MAX_TERMS, InputError, check_weights, combine_terms, decode_base64_image, validate_vector
from clipsearch.images import decode_image

# Lengths 1..6 cover every padding case (0, 1 and 2 '=' characters) twice.
SAMPLES = [bytes(range(n)) for n in (1, 2, 3, 4, 5, 6)] + [bytes(range(256)) * 5]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def urlsafe(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def lines(text: str, width: int = 76, sep: str = "\n") -> str:
    return sep.join(text[i:i + width] for i in range(0, len(text), width))


def refused(value: Any, code: str, max_bytes: int = 10_000) -> InputError:
    with pytest.raises(InputError) as info:
        decode_base64_image(value, max_bytes)
    assert info.value.code == code
    assert info.value.status == {"invalid_image": 422, "payload_too_large": 413}[code]
    assert str(info.value) == info.value.message
    return info.value


# --- base64 images -------------------------------------------------------------------------------

@pytest.mark.parametrize("data", SAMPLES, ids=lambda d: f"{len(d)}B")
@pytest.mark.parametrize("encode", [
    pytest.param(b64, id="standard"),
    pytest.param(lambda d: b64(d).rstrip("="), id="standard-unpadded"),
    pytest.param(urlsafe, id="urlsafe"),
    pytest.param(lambda d: urlsafe(d).rstrip("="), id="urlsafe-unpadded"),
    pytest.param(lambda d: lines(b64(d)), id="mime-lines"),
    pytest.param(lambda d: lines(b64(d), 4, "\r\n"), id="crlf-every-4"),
    pytest.param(lambda d: " \t" + " ".join(b64(d)) + "\n\n", id="spaces-everywhere"),
    pytest.param(lambda d: "data:image/png;base64," + b64(d), id="data-uri"),
    pytest.param(lambda d: "\n DATA:IMAGE/JPEG;BASE64," + lines(urlsafe(d).rstrip("=")), id="data-uri-upper-urlsafe"),
    pytest.param(lambda d: "data:image/webp;name=q.webp;base64," + b64(d), id="data-uri-params"),
    pytest.param(lambda d: "data:image/svg+xml ; base64 ," + b64(d), id="data-uri-spaced"),
])
def test_decodes_every_accepted_form(data: bytes, encode) -> None:
    assert decode_base64_image(encode(data), 10_000) == data


def test_decoded_png_goes_through_the_image_decoder(fakes) -> None:
    png = fakes.png_bytes(fakes.image("solid", "red"))
    raw = decode_base64_image("data:image/png;base64," + b64(png), len(png))
    assert raw == png
    assert decode_image(raw, max_pixels=32 * 32).size == (32, 32)


@pytest.mark.parametrize("value", ["", "   ", "\n\t\r\n", "====", "= =\n=", "data:image/png;base64,",
                                   "data:image/png;base64,  \n"])
def test_empty_is_refused(value: str) -> None:
    assert refused(value, "invalid_image").message == "image is empty"


@pytest.mark.parametrize("value", [
    pytest.param("QUJD$$$$", id="foreign-character"),
    pytest.param("QUJDR", id="one-char-over-a-block"),
    pytest.param("QUJD=QUJD", id="padding-in-the-middle"),
    pytest.param("QQ==QQ==", id="two-padded-blocks"),
    pytest.param("QU+D_w", id="mixed-alphabets"),
    pytest.param("QUJDé", id="non-ascii"),
    pytest.param("QUJD\x00", id="nul"),
    pytest.param("data:text/plain;base64,QUJD", id="data-uri-not-image"),
    pytest.param("data:;base64,QUJD", id="data-uri-no-type"),
    pytest.param("data:image/png,QUJD", id="data-uri-not-base64"),
    pytest.param("data:image/png;base64", id="data-uri-no-comma"),
    pytest.param("data:image/png;charset=utf-8,QUJD", id="data-uri-other-param"),
    pytest.param("data:image/;base64,QUJD", id="data-uri-no-subtype"),
])
def test_bad_base64_is_refused(value: str) -> None:
    refused(value, "invalid_image")


@pytest.mark.parametrize("value", [None, b"QUJD", 1234, ["QUJD"]])
def test_non_strings_are_refused(value: Any) -> None:
    refused(value, "invalid_image")


@pytest.mark.parametrize("value", ["SECRET-TOKEN$%", "data:text/SECRET-TOKEN;base64,QUJD",
                                   "data:image/png;SECRET-TOKEN,QUJD"])
def test_messages_never_echo_the_input(value: str) -> None:
    assert "SECRET" not in refused(value, "invalid_image").message


@pytest.mark.parametrize("encode", [b64, lambda d: b64(d).rstrip("="), lambda d: "\n".join(b64(d))],
                         ids=["padded", "unpadded", "newline-after-every-char"])
def test_size_cap_is_exact(encode) -> None:
    data = bytes(range(256)) * 4 + b"xy"  # 1026 bytes: the encoding ends in one '='
    assert decode_base64_image(encode(data), len(data)) == data
    err = refused(encode(data), "payload_too_large", max_bytes=len(data) - 1)
    assert "1,025-byte limit" in err.message


def test_oversize_is_refused_before_anything_is_decoded(monkeypatch) -> None:
    def no_decoding(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("decoded an oversized payload")

    monkeypatch.setattr(inputs.binascii, "a2b_base64", no_decoding)
    huge = "QUJD" * (5 << 20)  # 20 MiB of base64, 15 MiB decoded
    refused(huge, "payload_too_large", max_bytes=1 << 20)
    refused("data:image/png;base64," + huge, "payload_too_large", max_bytes=1 << 20)


# --- vectors ---------------------------------------------------------------------------------------

def vector_refused(values: Any, dim: int = 3) -> InputError:
    with pytest.raises(InputError) as info:
        validate_vector(values, dim)
    assert (info.value.code, info.value.status) == ("invalid_request", 422)
    return info.value


def test_vector_is_normalised_exactly() -> None:
    out = validate_vector([3, 4, 0], 3)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, np.array([0.6, 0.8, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(validate_vector([0, -2.5, 0], 3), np.array([0, -1, 0], dtype=np.float32))


def test_vector_extremes_normalise_without_overflow() -> None:
    np.testing.assert_allclose(validate_vector([1e308, -1e308], 2), [math.sqrt(0.5), -math.sqrt(0.5)], rtol=1e-7)
    np.testing.assert_allclose(validate_vector([1e-11, 0], 2), [1, 0])
    out = validate_vector(list(np.random.default_rng(0).standard_normal(512)), 512)
    assert out.shape == (512,) and abs(float(np.linalg.norm(out)) - 1) < 1e-6


@pytest.mark.parametrize("values, dim, needle", [
    ([1.0, 2.0], 3, "exactly 3 numbers, got 2"),
    ([1.0, 2.0, 3.0, 4.0], 3, "exactly 3 numbers, got 4"),
    ([], 3, "exactly 3 numbers, got 0"),
    ([1.0, math.nan, 0.0], 3, "NaN or infinity"),
    ([1.0, math.inf, 0.0], 3, "NaN or infinity"),
    ([-math.inf, 0.0, 0.0], 3, "NaN or infinity"),
    ([0.0, 0.0, 0.0], 3, "zero vector"),
    ([1e-13, 0.0, -1e-13], 3, "zero vector"),
    ([[1.0, 2.0, 3.0]], 3, "flat list"),
    ("abc", 3, "list of numbers"),
    (["1", "x", "2"], 3, "list of numbers"),
    ([True, False, True], 3, "not booleans"),
])
def test_bad_vectors_are_refused(values: Any, dim: int, needle: str) -> None:
    assert needle in vector_refused(values, dim).message


# --- weighted terms --------------------------------------------------------------------------------

A = np.array([1, 0, 0], dtype=np.float32)
B = np.array([0, 1, 0], dtype=np.float32)


def terms_refused(vectors: Any, weights: Any, needle: str, **kw: Any) -> None:
    with pytest.raises(InputError) as info:
        combine_terms(vectors, weights, **kw)
    assert (info.value.code, info.value.status) == ("invalid_request", 422)
    assert needle in info.value.message


def test_weighted_sum_a_plus_one_b_minus_half() -> None:
    out = combine_terms([A, B], [1.0, -0.5])
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, np.array([1.0, -0.5, 0.0]) / math.sqrt(1.25), rtol=1e-7, atol=1e-8)


def test_weighted_sum_of_non_orthogonal_vectors() -> None:
    c = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    # 1*c - 0.5*A = (0.1, 0.8, 0); |.| = sqrt(0.65)
    np.testing.assert_allclose(combine_terms([c, A], [1, -0.5]), np.array([0.1, 0.8, 0]) / math.sqrt(0.65),
                               rtol=1e-6, atol=1e-7)


def test_single_term_and_scale_invariance() -> None:
    np.testing.assert_array_equal(combine_terms([A], [2.0]), A)
    np.testing.assert_array_equal(combine_terms([A], [-0.1]), -A)
    # Each term is normalised first: a longer vector does not outweigh its weight.
    np.testing.assert_allclose(combine_terms([5 * A, B], [1, 1]), np.array([1, 1, 0]) / math.sqrt(2), rtol=1e-7)
    # A zero weight leaves its term out.
    np.testing.assert_array_equal(combine_terms([A, B], [0.0, 3.0]), B)


@pytest.mark.parametrize("vectors, weights, needle", [
    ([A, B], [0.0, 0.0], "all zero"),
    ([A], [-0.0], "all zero"),
    ([A, A], [1.0, -1.0], "cancel out"),
    ([A, A * np.float32(1 + 1e-7)], [2.0, -2.0], "cancel out"),
    ([A, B, A, B], [1.0, 1.0, -1.0, -1.0], "cancel out"),
    ([A, B], [1.0, math.nan], "terms[1].weight must be finite"),
    ([A, B], [math.inf, 1.0], "terms[0].weight must be finite"),
    ([A, B], [True, 1.0], "terms[0].weight must be a number"),
    ([A, B], [1.0, "2"], "terms[1].weight must be a number"),
    ([], [], "at least one term"),
    ([A], [1.0, 1.0], "1 term vectors for 2 weights"),
    ([A, B[:2]], [1.0, 1.0], "differ in length"),
    ([A, np.zeros(3, np.float32)], [1.0, 1.0], "terms[1] is a zero vector"),
    ([A, np.array([np.nan, 0, 0])], [1.0, 1.0], "terms[1] must not contain NaN"),
    ([np.ones((2, 3))], [1.0], "flat list"),
])
def test_bad_terms_are_refused(vectors: Any, weights: Any, needle: str) -> None:
    terms_refused(vectors, weights, needle)


def test_term_count_limit() -> None:
    combine_terms([A] * MAX_TERMS, [1.0] * MAX_TERMS)
    terms_refused([A] * (MAX_TERMS + 1), [1.0] * (MAX_TERMS + 1), f"too many terms: {MAX_TERMS + 1}")
    terms_refused([A] * 3, [1.0] * 3, "too many terms: 3 (limit 2)", max_terms=2)


def test_weights_can_be_checked_before_encoding() -> None:
    check_weights([1.0, -0.5, 0])
    for weights, needle in (([0, 0.0], "all zero"), ([1.0] * (MAX_TERMS + 1), "too many terms"),
                            ([math.nan], "finite"), ([], "at least one")):
        with pytest.raises(InputError, match=needle.replace("(", r"\(")):
            check_weights(weights)
