"""Bytes -> a Pillow image, with Pillow's own guards: content sniffing (the bytes decide the
format, never a name or a MIME type) and its decompression-bomb limit, raised to an error."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are refused here
MAX_PIXELS = 89_478_485  # Pillow's default (about 0.25 GB of RGBA)


@dataclass(frozen=True)
class Image:
    """A decoded image and the hash of its bytes (the prefix cache keys image rows by it)."""

    pil: Any  # PIL.Image.Image, fully loaded
    digest: str  # sha256 of the encoded bytes


def decode(data: bytes, where: str) -> Image:
    """Encoded image bytes -> Image; anything Pillow cannot read as an image is one UserError
    naming `where` (the flag, field or file the bytes came from)."""
    from PIL import Image as PILImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            PILImage.MAX_IMAGE_PIXELS = MAX_PIXELS
            img = PILImage.open(io.BytesIO(data))
            img.load()
    except (PILImage.DecompressionBombWarning, PILImage.DecompressionBombError):
        raise UserError(f"{where}: the image is larger than {MAX_PIXELS} pixels (a decompression bomb?); "
                        "send a smaller image.") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for undecodable bytes
        raise UserError(f"{where}: the bytes are not an image Pillow can read ({type(e).__name__}); "
                        "send a PNG, JPEG, GIF, WebP or BMP image.") from None
    return Image(img, hashlib.sha256(data).hexdigest())


def from_data_uri(uri: str, where: str) -> Image:
    """data:[<mime>][;base64],<payload>; the MIME type is ignored (the bytes are sniffed). The
    scheme and the ;base64 label in any case, and the payload decoded as the WHATWG "forgiving
    base64" does (as browsers decode data: URLs): ASCII whitespace dropped (`base64` wraps its
    output at 76 columns), the = padding optional."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().startswith("data:"):
        raise UserError(f"{where}: a data URI must look like data:image/png;base64,<bytes>.")
    if not head.lower().replace(" ", "").endswith(";base64"):
        raise UserError(f"{where}: only base64 data URIs are supported (data:image/png;base64,...).")
    payload = re.sub(r"[\t\n\f\r ]", "", payload)
    if len(payload) % 4 == 0 and payload.endswith("="):
        payload = payload[:-2] if payload.endswith("==") else payload[:-1]
    try:
        if len(payload) % 4 == 1:
            raise ValueError("one character too many")
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{where}: the data URI's payload is not valid base64.") from None
    return decode(data, where)


def from_path(path: str, where: str) -> Image:
    """A local file (the CLI and the Python API only: the server never reads local paths)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot read the image file {p} ({e.strerror or e}).") from None
    return decode(data, f"{where} {p}")
