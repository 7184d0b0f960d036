"""Shared image decoding: untrusted bytes or files in, a plain RGB ``PIL.Image`` out.

Used by the offline pipeline (dataset validation, embedding) and by the web service, so it
treats every input as hostile: the pixel count is checked from the header before any pixel is
decoded, every failure becomes one exception type with a short message, and no file handle
outlives the call.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "ImageDecodeError", "decode_image", "decode_image_with_format",
           "decode_image_with_mode"]

#: Largest accepted width*height. 40 MP covers any real camera photo; beyond that a request is
#: more likely a decompression bomb than a picture someone wants to search with.
MAX_IMAGE_PIXELS = 40_000_000

# warnings.catch_warnings() swaps process-global state; serialising the (header-only, fast)
# Image.open call keeps concurrent decoders from restoring each other's filters wrongly.
_OPEN_LOCK = threading.Lock()

_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class ImageDecodeError(ValueError):
    """The input is not an image we can use (corrupt, truncated, empty, too large, ...).

    The message is meant for end users: short, and free of server file system paths.
    """


def decode_image(data: bytes | bytearray | memoryview | str | Path,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``data`` (raw bytes or a file path) into a fully loaded RGB image.

    Applies the EXIF orientation, keeps only the first frame of animations, composites
    transparency onto white and scales 16-bit / integer / float images to 8 bits.

    Raises:
        ImageDecodeError: for any input that cannot be decoded safely.
    """
    return _decode(data, max_pixels)[0]


def decode_image_with_mode(data: bytes | bytearray | memoryview | str | Path,
                           max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str]:
    """Like :func:`decode_image`, but also return the image's original PIL mode (e.g. ``"CMYK"``).

    Dataset validation uses the mode to report what it found in a corpus.
    """
    image, mode, _ = _decode(data, max_pixels)
    return image, mode


def decode_image_with_format(data: bytes | bytearray | memoryview | str | Path,
                             max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str | None]:
    """Like :func:`decode_image`, but also return the PIL format it was decoded from (e.g. ``"PNG"``):
    an upload is decoded once, and its stored file named by that format."""
    image, _, fmt = _decode(data, max_pixels)
    return image, fmt


def _decode(data: bytes | bytearray | memoryview | str | Path, max_pixels: int
            ) -> tuple[Image.Image, str, str | None]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if not raw:
            raise ImageDecodeError("empty image data (0 bytes)")
        return _decode_stream(io.BytesIO(raw), max_pixels)
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise ImageDecodeError("image file not found") from None
        except IsADirectoryError:
            raise ImageDecodeError("image path is a directory, not a file") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ImageDecodeError(f"cannot read image file ({reason})") from None
        with fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ImageDecodeError("empty image file (0 bytes)")
            return _decode_stream(fh, max_pixels)
    raise TypeError(f"decode_image expects bytes or a path, not {type(data).__name__}")


def _decode_stream(fh: io.BufferedIOBase, max_pixels: int) -> tuple[Image.Image, str, str | None]:
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image is too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for hostile input
        raise ImageDecodeError(f"not a recognised image ({_reason(exc)})") from None

    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image declares an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"image is too large: {width}x{height} = {width * height:,} pixels "
                f"(limit {max_pixels:,})")
        mode = im.mode
        try:
            im.seek(0)  # first frame of animated GIF/PNG/WebP/TIFF
            im.load()
            oriented = _apply_orientation(im)
            rgb = _to_rgb(oriented)
            if oriented is not im and oriented is not rgb:
                oriented.close()
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("image is too large (decompression bomb guard)") from None
        except MemoryError:
            raise ImageDecodeError("image is too large to decode") from None
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many types
            raise ImageDecodeError(f"corrupt or truncated image ({_reason(exc)})") from None
        return rgb, mode, im.format
    finally:
        im.close()


def _apply_orientation(im: Image.Image) -> Image.Image:
    """EXIF-transpose; a malformed EXIF block only costs the orientation, not the image."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - EXIF parsing of hostile data fails in many ways
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Return a new RGB image; never returns ``im`` itself so the caller can close it."""
    mode = im.mode
    if mode in _WIDE_GRAY_MODES:
        return Image.fromarray(_gray_to_uint8(im), "L").convert("RGB")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        rgba.close()
        out = canvas.convert("RGB")
        canvas.close()
        return out
    if mode == "RGB":
        return im.copy()
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported image mode {mode!r}") from exc


def _gray_to_uint8(im: Image.Image) -> np.ndarray:
    """Map a wide single-channel image to 0..255.

    16-bit data uses its full nominal range (/257) so a dark photo stays dark; "I" images in
    0..65535 are 16-bit PNG/TIFF data opened by PIL as 32-bit and get the same treatment; float
    images in 0..1 are the usual normalised convention. Anything else is min-max stretched
    because there is no nominal range to honour.
    """
    arr = np.asarray(im, dtype=np.float64)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """A short cause that never leaks file system paths."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not msg or "/" in msg or "\\" in msg:
        return type(exc).__name__
    return msg[:120]
