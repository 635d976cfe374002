"""Ray role: online serving. A Serve deployment over the core, one HTTP request per image:

    POST /segment -> read body (size cap) -> decode + resize (CPU, per request)
                  -> predict_batch (@serve.batch: concurrent requests share one Segmenter pass)
                  -> resize mask to the source size -> palette PNG | overlay PNG | JSON

The palette PNG is what ``raydeeplab predict`` writes for the same image (same Segmenter,
same resize, same encoder). Runtime knobs live in ``user_config`` (:class:`Knobs`):
``model``, ``max_batch_size`` and ``batch_wait_timeout_s`` change without a redeploy.

    raydeeplab serve --model s3://runs/voc-r50/best --replicas 2 --gpus-per-replica 1
    serve deploy configs/serve_config.yaml   # import_path raydeeplab.serve:app_builder, with `args`
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods.
import asyncio
import collections
import dataclasses
import hmac
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from raydeeplab import telemetry
from raydeeplab.config import ConfigError, Knobs, ServeConfig, inference_precision
from raydeeplab.data.images import (
    ImageError,
    decode_image,
    encode_mask_png,
    overlay,
    resize_image,
    resize_mask,
)
from raydeeplab.page import page_html

logger = logging.getLogger("ray.serve")  # replica logs go to Serve's log files

APP_NAME = "raydeeplab"
FORMATS = ("png", "overlay", "json")
BATCH_SIZE_HEADER = "X-Batch-Size"
RECENT_BATCHES = 256  # batch sizes kept for GET /stats


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


# ---------------------------------------------------------------- request helpers (no Ray)


def device_batch_sizes(max_batch_size: int) -> list[int]:
    """Shapes compiled at warmup: powers of two up to ``max_batch_size``, and it.

    A lone request then runs a batch of 1 instead of being padded to ``max_batch_size``.
    """
    sizes, size = {max_batch_size}, 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


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
        raise HTTPException(400, f"multipart body has no {field!r} file field")
    try:
        return await upload.read()
    finally:
        await form.close()


def prepare(data: bytes, image_size: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """bytes -> (source ``(H, W, 3) uint8``, model input ``(S, S, 3) uint8``); ImageError if bad."""
    image = decode_image(data, max_pixels)
    return image, resize_image(image, image_size)


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


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """One model version on this replica: its Segmenters, one per compiled batch shape."""

    spec: str
    info: Any  # raydeeplab.presets.ModelInfo
    model: Any  # keras-hub ImageSegmenter
    segmenters: dict  # device batch size -> raydeeplab.segmenter.Segmenter

    def device_batch(self, count: int) -> int:
        """The smallest compiled batch shape that holds ``count`` images (else the largest)."""
        sizes = sorted(self.segmenters)
        return next((size for size in sizes if size >= count), sizes[-1])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3) uint8`` -> ``(n, S, S) uint8`` on the smallest compiled shape that fits."""
        return self.segmenters[self.device_batch(len(images))].predict(images)


class Served(NamedTuple):
    mask: np.ndarray  # (S, S) uint8
    batch_size: int  # requests in the forward pass that computed it
    model: LoadedModel


def render(output: str, image: np.ndarray, served: Served, rle: bool) -> Response:
    """The mask at the source size, as the requested format."""
    height, width = image.shape[:2]
    mask = resize_mask(served.mask, height, width)
    headers = {BATCH_SIZE_HEADER: str(served.batch_size)}
    if output == "png":
        return Response(encode_mask_png(mask), media_type="image/png", headers=headers)
    if output == "overlay":
        return Response(encode_png(overlay(image, mask)), media_type="image/png", headers=headers)
    info = served.model.info
    counts = np.bincount(mask.ravel(), minlength=info.num_classes)
    body = {
        "height": height,
        "width": width,
        "model": served.model.spec,
        "class_pixel_counts": counts.tolist(),
        "class_areas": {name: float(c) / mask.size for name, c in zip(info.class_names, counts)},
        "batch_size": served.batch_size,
    }
    if rle:
        body["rle"] = run_lengths(mask)
    return JSONResponse(body, headers=headers)


# ---------------------------------------------------------------- the deployment

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
}


@serve.deployment
@serve.ingress(api)
class SegmenterDeployment:
    """HTTP segmentation; one model load per replica, concurrent requests batched on device."""

    def __init__(self, args: dict[str, Any]):
        self.args = ServeConfig.from_dict(args)
        self.token = read_auth_token(self.args.auth_token_env, self.args.auth_token_file)
        self.loaded: LoadedModel | None = None  # set by the first reconfigure(), before any traffic
        self.knobs: Knobs | None = None
        self.recent = collections.deque(maxlen=RECENT_BATCHES)
        self.requests = 0  # that reached predict_batch
        self.forward_passes = 0

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this right after ``__init__`` and on every ``user_config`` change.

        The model is loaded here, not in ``__init__``, so that a ``user_config`` naming another
        model than the built one costs one load, not two. A new model or batch size is built
        and compiled off the event loop while the old one keeps serving, then swapped in.
        """
        knobs = Knobs.from_dict(user_config)
        if self.loaded is None or knobs.model != self.loaded.spec or (
            device_batch_sizes(knobs.max_batch_size) != sorted(self.loaded.segmenters)
        ):
            self.loaded = await asyncio.to_thread(self.load, knobs, self.loaded)
        self.predict_batch.set_max_batch_size(knobs.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)
        self.knobs = knobs

    def load(self, knobs: Knobs, previous: LoadedModel | None) -> LoadedModel:
        from raydeeplab.presets import describe_model, load_model
        from raydeeplab.segmenter import Segmenter, enable_compilation_cache

        started = time.perf_counter()
        args = self.args
        enable_compilation_cache(args.compile_cache)
        same_model = previous is not None and previous.spec == knobs.model
        if same_model:
            info, model = previous.info, previous.model
        else:
            precision = inference_precision(args.precision, args.gpus_per_replica > 0)
            info = describe_model(knobs.model, args.num_classes, args.image_size)
            model = load_model(knobs.model, args.num_classes, args.image_size, precision, args.model_cache)
        segmenters = {}
        for size in device_batch_sizes(knobs.max_batch_size):
            if same_model and size in previous.segmenters:
                segmenters[size] = previous.segmenters[size]  # already compiled
                continue
            segmenters[size] = Segmenter(model, size)
            segmenters[size].warmup()
        logger.info(
            "model %s ready: %d classes at %dpx, device batches %s, in %.1fs",
            knobs.model, info.num_classes, info.image_size, sorted(segmenters),
            time.perf_counter() - started,
        )  # fmt: skip
        return LoadedModel(knobs.model, info, model, segmenters)

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded: user_config must name a `model`")

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[Served]:
        """Each ``(S, S, 3) uint8`` -> its mask; every call is one forward pass of ``len(images)``."""
        loaded = self.loaded
        size = loaded.info.image_size
        # Only during a model swap to another input size can a request arrive resized for the old one.
        batch = np.stack([im if im.shape[0] == size else resize_image(im, size) for im in images])
        started = time.perf_counter()
        masks = await asyncio.to_thread(loaded.predict, batch)  # the event loop keeps decoding
        self.recent.append(len(images))
        self.forward_passes += 1
        fill = len(images) / loaded.device_batch(len(images))
        telemetry.serve_batch(len(images), time.perf_counter() - started, fill)
        return [Served(mask, len(images), loaded) for mask in masks]

    @api.post("/segment", openapi_extra=SEGMENT_BODY, responses=SEGMENT_RESPONSES)
    async def segment(
        self,
        request: Request,
        output: str = Query("png", alias="format", description="png | overlay | json"),
        rle: bool = Query(False, description="json only: add a row-major run-length encoding"),
    ) -> Response:
        """Segment one image (multipart field ``image`` or the raw body)."""
        self.authorize(request)
        if output not in FORMATS:
            raise HTTPException(400, f"format must be one of {', '.join(FORMATS)}, got {output!r}")
        data = await read_image(request, self.args.max_body_bytes)
        try:
            image, small = await asyncio.to_thread(
                prepare, data, self.loaded.info.image_size, self.args.max_pixels
            )
        except ImageError as err:  # refused here, so it never reaches (or fails) a batch
            raise HTTPException(400, str(err)) from None
        self.requests += 1
        served = await self.predict_batch(small)
        return await asyncio.to_thread(render, output, image, served, rle)

    @api.get("/", include_in_schema=False)
    def page(self) -> HTMLResponse:
        """The browser page (raydeeplab/static/index.html); open: it asks for the token itself."""
        return HTMLResponse(page_html())

    @api.get("/healthz")
    def healthz(self) -> dict:
        """Liveness; open even when auth is on."""
        if self.loaded is None:
            raise HTTPException(503, "model not loaded")
        return {"status": "ok"}

    @api.get("/model")
    def describe(self, request: Request) -> dict:
        """The model this replica serves and its batching knobs."""
        self.authorize(request)
        loaded, knobs = self.loaded, self.knobs
        return {
            "id": loaded.spec,
            "class_names": list(loaded.info.class_names),
            "num_classes": loaded.info.num_classes,
            "input_size": loaded.info.image_size,
            "max_batch_size": knobs.max_batch_size,
            "batch_wait_timeout_s": knobs.batch_wait_timeout_s,
            "device_batch_sizes": sorted(loaded.segmenters),
            "keras_backend": self.args.keras_backend,
        }

    @api.get("/stats")
    def stats(self, request: Request) -> dict:
        """This replica's counters: the sizes of its recent forward passes."""
        self.authorize(request)
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "requests": self.requests,
            "forward_passes": self.forward_passes,
            "recent_batch_sizes": list(self.recent),
        }


# ---------------------------------------------------------------- builders


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``args`` (see :class:`~raydeeplab.config.ServeConfig`) -> bound deployment."""
    config = ServeConfig.from_dict(args)
    options: dict[str, Any] = {
        "user_config": config.knobs().model_dump(),
        # One batch on the device while the next one fills up. Never tiny, even unbatched: a full
        # replica sends callers into the router's retry backoff (4x less throughput at B=1).
        "max_ongoing_requests": config.max_ongoing_requests or max(2 * config.max_batch_size, 8),
        "ray_actor_options": {
            "num_cpus": config.cpus_per_replica,
            "num_gpus": config.gpus_per_replica,
            # Keras picks its backend at import: it must be set before the replica imports it.
            "runtime_env": {"env_vars": {"KERAS_BACKEND": config.keras_backend}},
        },
    }
    if config.autoscaling_config is not None:
        options["autoscaling_config"] = config.autoscaling_config
    else:
        options["num_replicas"] = config.replicas
    return SegmenterDeployment.options(**options).bind(config.model_dump())


# A random-init `tiny` model without auth, to try Serve locally (`serve run raydeeplab.serve:app`);
# deployments name the builder and its `args` (configs/serve_config.yaml).
app = app_builder({})
