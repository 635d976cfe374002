"""The HTTP surface of the Serve app (no Ray): who may call, how a body is read, what comes back.

    request -> check_bearer -> read_image (size cap; multipart through Starlette's parser)
            -> prepare (decode, fit to the model's square by the --resize policy)
            ... the deployment's batched forward pass (raydeeplab.serve) ...
            -> render (mask back at the source size: palette PNG | overlay PNG | JSON + RLE)

The palette PNG is what ``raydeeplab predict`` writes for the same image (same Segmenter, same
resize policy, same encoder). :data:`api` carries the OpenAPI schemas and the routes that need
no replica state (the browser page); :mod:`raydeeplab.serve` adds the others on its class.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the routes.
import hmac
import io
import os
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from raydeeplab.config import ConfigError
from raydeeplab.data.images import decode_image, encode_mask_png, fit_image, overlay, restore_mask
from raydeeplab.page import page_html

FORMATS = ("png", "overlay", "json")
BATCH_SIZE_HEADER = "X-Batch-Size"


# ---------------------------------------------------------------- who may call


def read_auth_token(env_name: str | None, file_path: str | None) -> str | None:
    """The bearer token from an env var or a secret file; None when auth is off."""
    if env_name:
        token = os.environ.get(env_name, "").strip()
        if not token:
            raise ConfigError(f"--auth-token-env {env_name}: the variable is not set or empty")
        return token
    if file_path:
        try:
            with open(file_path) as f:
                token = f.read().strip()
        except OSError as err:
            raise ConfigError(f"--auth-token-file {file_path}: {err.strerror}") from None
        if not token:
            raise ConfigError(f"--auth-token-file {file_path}: the file is empty")
        return token
    return None


def check_bearer(request: Request, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (no-op when auth is off);
    compared in constant time."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------- reading the image


async def capped_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body's chunks, refused with 413 past ``limit`` bytes (declared or actually
    sent), before more than ``limit`` bytes are read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes is over the {limit}-byte limit")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads declare nothing: count what arrives
            raise HTTPException(413, f"body is over the {limit}-byte limit")
        yield chunk


async def read_image(request: Request, limit: int, field: str = "image") -> bytes:
    """The image's bytes: the multipart ``field`` of a form upload (Starlette's parser), else
    the whole body; either way at most ``limit`` bytes are read."""
    body = capped_stream(request, limit)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return b"".join([chunk async for chunk in body])
    parser = MultiPartParser(request.headers, body, max_files=1, max_fields=16, max_part_size=limit)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise HTTPException(400, f"bad multipart body: {err.message}") from None
    upload = form.get(field)
    if not isinstance(upload, UploadFile):
        sent = "a text field, which cannot carry image bytes" if field in form else "nothing"
        raise HTTPException(400, f"multipart body has no {field!r} file field ({field!r} is {sent}; curl: -F {field}=@cat.jpg)")
    try:
        return await upload.read()
    finally:
        await form.close()


class Prepared(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8: the source, for the overlay and the output size
    model_input: np.ndarray  # (S, S, 3) uint8
    box: np.ndarray  # (4,) int32 (y0, y1, x0, x1): where the image lies in model_input


def prepare(data: bytes, image_size: int, max_pixels: int, resize: str) -> Prepared:
    """bytes -> the source and the model's input by the ``resize`` policy; ImageError if bad."""
    image = decode_image(data, max_pixels)
    return Prepared(image, *fit_image(image, image_size, resize))


# ---------------------------------------------------------------- answering


class Answer(NamedTuple):
    """One request's share of a forward pass."""

    mask: np.ndarray  # (S, S) uint8, the model's square
    box: np.ndarray  # (4,) int32: the image's part of it
    confidence: float  # mean top-class probability inside the box
    batch_size: int  # requests in the forward pass that computed it
    model: str  # the model spec that computed it
    class_names: tuple[str, ...]


def run_lengths(mask: np.ndarray) -> dict[str, Any]:
    """Row-major runs of a class map: ``np.repeat(values, lengths).reshape(h, w)`` restores it."""
    flat = mask.ravel()
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    lengths = np.diff(np.append(starts, flat.size))
    return {"order": "row-major", "values": flat[starts].tolist(), "lengths": lengths.tolist()}


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def render(output: str, image: np.ndarray, answer: Answer, rle: bool) -> Response:
    """The mask at the source size, as the requested format."""
    height, width = image.shape[:2]
    mask = restore_mask(answer.mask, answer.box, height, width)
    headers = {BATCH_SIZE_HEADER: str(answer.batch_size)}
    if output == "png":
        return Response(encode_mask_png(mask), media_type="image/png", headers=headers)
    if output == "overlay":
        return Response(encode_png(overlay(image, mask)), media_type="image/png", headers=headers)
    counts = np.bincount(mask.ravel(), minlength=len(answer.class_names))
    body = {
        "height": height,
        "width": width,
        "model": answer.model,
        "class_pixel_counts": counts.tolist(),
        "class_areas": {name: float(c) / mask.size for name, c in zip(answer.class_names, counts)},
        "confidence": answer.confidence,
        "batch_size": answer.batch_size,
    }
    if rle:
        body["rle"] = run_lengths(mask)
    return JSONResponse(body, headers=headers)


# ---------------------------------------------------------------- the app and its schemas

api = FastAPI(
    title="raydeeplab",
    description="DeepLabV3+ semantic segmentation. POST an image to /segment.",
)

SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
SEGMENT_RESPONSES = {
    200: {"content": {"image/png": {}, "application/json": {}}, "description": "mask, overlay or JSON"},
    400: {"description": "not an image, corrupt, too many pixels, or unsupported format"},
    401: {"description": "missing or wrong bearer token (when auth is on)"},
    413: {"description": "body over max_body_bytes"},
    503: {"description": "every replica busy and max_queued_requests waiting: retry after the Retry-After header's seconds"},
    504: {"description": "not answered within request_timeout_s"},
}


@api.get("/", include_in_schema=False)
def page() -> HTMLResponse:
    """The browser page (raydeeplab/static/index.html); open: it asks for the token itself."""
    return HTMLResponse(page_html())
