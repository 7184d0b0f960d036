"""Query inputs that are not plain text, checked without any HTTP in sight: base64 images (plain or
`data:` URIs), raw query vectors, and weighted sums of term vectors.

Every refusal is an `InputError` (an `app.errors.ApiError`) whose `code` the service maps onto its
error shape (`{"error": {"code", "message"}}`); messages describe the problem and never echo the
input, which may be megabytes of base64 or something a client should not see reflected back.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Sequence
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

from app.errors import ApiError

__all__ = ["InputError", "MAX_TERMS", "check_weights", "combine_terms", "decode_base64_image",
           "validate_vector"]

InputErrorCode = Literal["invalid_image", "payload_too_large", "invalid_request"]

#: Most terms in one weighted query. Each term may cost an encoder call, so routes should also put
#: this on the request model (`max_length`) to refuse before any encoding starts.
MAX_TERMS: Final = 16

# A vector (or weighted sum) shorter than this has no direction to search in.
_MIN_NORM: Final = 1e-12
# A weighted sum whose norm is this small relative to the sum of |weight|*|vector| is rounding noise
# left over from cancelling terms (e.g. the same text at +1 and -1): refuse it instead of searching
# for a random direction. float32 inputs round at ~6e-8, so 1e-6 leaves a wide margin.
_CANCEL_RTOL: Final = 1e-6

# `data:[<media type>][;<param>]*;base64,<data>`; the media type must be an image type.
_DATA_URI: Final = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_IMAGE_TYPE: Final = re.compile(r"image/[a-z0-9][a-z0-9.+-]*", re.IGNORECASE)
_WHITESPACE: Final = " \t\r\n\f\v"
_LEADING_SPACE: Final = re.compile(r"[ \t\r\n\f\v]*")


class InputError(ApiError, ValueError):
    """A query input the service refuses; `message` is safe to show the client as it is. (A
    ValueError too: raised in a request model's validator, pydantic reports it as invalid input.)"""

    def __init__(self, code: InputErrorCode, message: str):
        super().__init__(message, code=code)


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image: plain base64 (standard or URL-safe alphabet, padding optional,
    whitespace and line breaks anywhere) or a `data:image/<type>;base64,<data>` URI.

    The decoded size is computed from the encoded length before anything is decoded, so an
    oversized value costs no allocation. The bytes are not checked to be an image: the caller runs
    `clipsearch.images.decode_image` with the pixel cap, exactly as for uploads.

    Raises:
        InputError: "invalid_image" (not base64, empty, a data URI that is not base64 image data),
            "payload_too_large" (decodes to more than `max_bytes`).
    """
    if not isinstance(value, str):
        raise InputError("invalid_image", "image must be a base64 string or a data: URI")
    start = _payload_start(value)

    # Exact decoded size from the character counts alone (str.count runs in C and copies nothing):
    # every 4 alphabet characters carry 3 bytes, padding and whitespace carry none.
    spaces = sum(value.count(c, start) for c in _WHITESPACE)
    chars = len(value) - start - spaces - value.count("=", start)
    if chars <= 0:
        raise InputError("invalid_image", "image is empty")
    if chars * 3 // 4 > max_bytes:
        raise InputError("payload_too_large",
                         f"image is larger than the {max_bytes:,}-byte limit once decoded")

    # Only now, with the size known to fit, is the payload copied.
    data = "".join(value[start:].split()) if spaces else value[start:]
    data = _standard_alphabet(data.rstrip("="))
    if len(data) % 4 == 1:  # no number of bytes encodes to 4n+1 characters
        raise InputError("invalid_image", "image is not valid base64 (truncated or extra characters)")
    data += "=" * (-len(data) % 4)
    try:
        # strict_mode refuses characters outside the alphabet and padding anywhere but the end,
        # instead of silently skipping them as the default (lenient) decoder does.
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in the string
        raise InputError("invalid_image", "image is not valid base64") from None
    if not raw:
        raise InputError("invalid_image", "image is empty")
    if len(raw) > max_bytes:  # cannot happen after the count above; kept as the actual guarantee
        raise InputError("payload_too_large",
                         f"image is larger than the {max_bytes:,}-byte limit once decoded")
    return raw


def _payload_start(value: str) -> int:
    """Where the base64 starts: after the comma of a data: URI, else 0 (the whole value)."""
    lead = _LEADING_SPACE.match(value).end()  # type: ignore[union-attr]  # (always matches)
    if value[lead:lead + 5].lower() != "data:":
        return 0
    match = _DATA_URI.match(value, lead)
    if match is None:
        raise InputError("invalid_image", "malformed data: URI (expected data:image/<type>;base64,...)")
    if not _IMAGE_TYPE.fullmatch(match["type"].strip()):
        raise InputError("invalid_image", "data: URI must have an image/* media type")
    params = [p.strip().lower() for p in match["params"].split(";")[1:]]
    if not params or params[-1] != "base64":
        raise InputError("invalid_image", "data: URI must be base64-encoded (;base64,)")
    return match.end()


def _standard_alphabet(data: str) -> str:
    """URL-safe base64 (-_) mapped to the standard alphabet (+/); a mix of both is refused, since
    no encoder produces one and guessing could decode garbage."""
    urlsafe = "-" in data or "_" in data
    if not urlsafe:
        return data
    if "+" in data or "/" in data:
        raise InputError("invalid_image", "image mixes the standard and URL-safe base64 alphabets")
    return data.translate(_URLSAFE_TO_STD)


_URLSAFE_TO_STD: Final = str.maketrans("-_", "+/")


def validate_vector(values: Sequence[float], dim: int) -> NDArray[np.float32]:
    """A client's query vector, checked and L2-normalised to a float32 array of shape (dim,).

    Raises:
        InputError("invalid_request"): not a flat list of `dim` numbers, NaN or infinity, or a
            zero vector (norm below 1e-12), which has no direction to search in.
    """
    vec = _as_vector(values, "vector")
    if vec.shape != (dim,):
        raise InputError("invalid_request", f"vector must have exactly {dim} numbers, got {vec.size}")
    return _normalised(vec, "vector")


def check_weights(weights: Sequence[float], max_terms: int = MAX_TERMS) -> None:
    """The checks on term weights that need no vectors, so a route can run them before it spends
    encoder time: 1..max_terms finite weights, not all zero (negative weights are fine).

    Raises:
        InputError("invalid_request")
    """
    n = len(weights)
    if n == 0:
        raise InputError("invalid_request", "terms must hold at least one term")
    if n > max_terms:
        raise InputError("invalid_request", f"too many terms: {n} (limit {max_terms})")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise InputError("invalid_request", f"terms[{i}].weight must be a number")
        if not math.isfinite(float(w)):
            raise InputError("invalid_request", f"terms[{i}].weight must be finite")
    if all(float(w) == 0.0 for w in weights):
        raise InputError("invalid_request", "term weights are all zero")


def combine_terms(vectors: Sequence[NDArray[np.floating]], weights: Sequence[float],
                  max_terms: int = MAX_TERMS) -> NDArray[np.float32]:
    """The L2-normalised weighted sum of the term vectors, as float32.

    Each vector is normalised first (a no-op for the encoders' unit vectors), so a weight says how
    much of that term's direction goes into the query whatever the vector's scale. The sum is taken
    in float64.

    Raises:
        InputError("invalid_request"): the weight checks of `check_weights`, vectors that do not
            match the weights in number or each other in shape, non-finite or zero vectors, or
            terms that cancel out (the sum's norm is ~0 relative to the terms').
    """
    check_weights(weights, max_terms)
    if len(vectors) != len(weights):
        raise InputError("invalid_request", f"{len(vectors)} term vectors for {len(weights)} weights")
    units = [_normalised(_as_vector(v, f"terms[{i}]"), f"terms[{i}]").astype(np.float64)
             for i, v in enumerate(vectors)]
    if len({u.shape for u in units}) != 1:
        raise InputError("invalid_request", "term vectors differ in length")
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    total = w @ np.stack(units)
    norm = float(np.linalg.norm(total))
    # Each unit vector has norm 1, so sum(|w|) bounds the sum's norm from above.
    if norm < _MIN_NORM or norm <= _CANCEL_RTOL * float(np.abs(w).sum()):
        raise InputError("invalid_request", "the weighted terms cancel out (their sum is a zero vector)")
    return (total / norm).astype(np.float32)


def _as_vector(values: Sequence[float] | NDArray[np.floating], what: str) -> NDArray[np.float64]:
    if isinstance(values, (str, bytes)):
        raise InputError("invalid_request", f"{what} must be a list of numbers")
    if not isinstance(values, np.ndarray) and any(isinstance(v, bool) for v in values):
        raise InputError("invalid_request", f"{what} must be a list of numbers, not booleans")
    try:
        vec = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # strings, None, ragged nesting
        raise InputError("invalid_request", f"{what} must be a list of numbers") from None
    if vec.ndim != 1:
        raise InputError("invalid_request", f"{what} must be a flat list of numbers")
    return vec


def _normalised(vec: NDArray[np.float64], what: str) -> NDArray[np.float32]:
    if not np.isfinite(vec).all():
        raise InputError("invalid_request", f"{what} must not contain NaN or infinity")
    # Scale by the largest entry first: values near float64's limit would overflow when squared.
    peak = float(np.abs(vec).max()) if vec.size else 0.0
    if peak == 0.0:
        raise InputError("invalid_request", f"{what} is a zero vector (no direction to search in)")
    scaled = vec / peak
    unit_norm = float(np.linalg.norm(scaled))  # in [1, sqrt(n)]: no overflow, no underflow
    if peak * unit_norm < _MIN_NORM:
        raise InputError("invalid_request", f"{what} is a zero vector (no direction to search in)")
    return (scaled / unit_norm).astype(np.float32)
