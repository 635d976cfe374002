"""Ray role: online serving. The Serve deployment over the core and the HTTP surface
(:mod:`raydeeplab.api`), one HTTP request per image:

    POST /segment -> api.read_image -> api.prepare (CPU, per request)
                  -> predict_batch (@serve.batch: concurrent requests share one Segmenter pass)
                  -> api.render (mask back at the source size)

Runtime knobs live in ``user_config`` (:class:`~raydeeplab.config.Knobs`): ``model``,
``max_batch_size`` and ``batch_wait_timeout_s`` change without a redeploy.

    raydeeplab serve --model s3://runs/voc-r50/best --replicas 2 --gpus-per-replica 1
    serve deploy configs/serve_config.yaml   # import_path raydeeplab.serve:app_builder, with `args`
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods.
import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any

import numpy as np
from fastapi import HTTPException, Query, Request
from fastapi.responses import Response
from ray import serve

from raydeeplab import telemetry
from raydeeplab.api import (
    FORMATS,
    SEGMENT_BODY,
    SEGMENT_RESPONSES,
    Answer,
    api,
    check_bearer,
    prepare,
    read_auth_token,
    read_image,
    render,
)
from raydeeplab.config import Knobs, ServeConfig, inference_precision
from raydeeplab.hub import keras_without_tensorflow
from raydeeplab.tta import TestTimeAugmentation
from raydeeplab.data.images import ImageError, resize_image

logger = logging.getLogger("ray.serve")  # replica logs go to Serve's log files

APP_NAME = "raydeeplab"
RECENT_BATCHES = 256  # batch sizes kept for GET /stats


def device_batch_sizes(max_batch_size: int) -> list[int]:
    """Shapes compiled at warmup: powers of two up to ``max_batch_size``, and it.

    A lone request then runs a batch of 1 instead of being padded to ``max_batch_size``.
    """
    sizes, size = {max_batch_size}, 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


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

    def segment(self, images: np.ndarray, boxes: np.ndarray):
        """``(n, S, S, 3) uint8`` and their boxes -> masks and confidence
        (:class:`~raydeeplab.segmenter.Prediction`) on the smallest compiled shape that fits."""
        return self.segmenters[self.device_batch(len(images))].segment(images, boxes)


def rescale(image: np.ndarray, box: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A model input fitted for another square size, stretched to ``size`` with its box."""
    scaled = np.rint(box * (size / image.shape[0])).astype(np.int32)
    return resize_image(image, size), scaled


# ---------------------------------------------------------------- the deployment


@serve.deployment
@serve.ingress(api)
class SegmenterDeployment:
    """HTTP segmentation; one model load per replica, concurrent requests batched on device."""

    def __init__(self, args: dict[str, Any]):
        keras_without_tensorflow()
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
        # Serve replaces the whole dict: a key it leaves out keeps the application's own value
        knobs = Knobs.from_dict({**self.args.knobs().model_dump(), **(user_config or {})})
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
            segmenters[size] = Segmenter(model, size, TestTimeAugmentation.parse(args.tta))
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

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, inputs: list[tuple[np.ndarray, np.ndarray]]) -> list[Answer]:
        """Each ``((S, S, 3) uint8 input, (4,) int32 box)`` -> its :class:`~raydeeplab.api.Answer`;
        every call is one forward pass of ``len(inputs)``."""
        loaded = self.loaded
        size = loaded.info.image_size
        # Only during a model swap to another input size can a request arrive fitted for the old one:
        # its square is stretched to the new one, and its box with it.
        fitted = [(im, box) if im.shape[0] == size else rescale(im, box, size) for im, box in inputs]
        images, boxes = (np.stack(part) for part in zip(*fitted))
        started = time.perf_counter()
        out = await asyncio.to_thread(loaded.segment, images, boxes)  # the event loop keeps decoding
        self.recent.append(len(inputs))
        self.forward_passes += 1
        fill = len(inputs) / loaded.device_batch(len(inputs))
        telemetry.serve_batch(len(inputs), time.perf_counter() - started, fill)
        names = tuple(loaded.info.class_names)
        return [
            Answer(mask, box, float(confidence), len(inputs), loaded.spec, names)
            for mask, box, confidence in zip(out.masks, boxes, out.confidence)
        ]

    @api.post("/segment", openapi_extra=SEGMENT_BODY, responses=SEGMENT_RESPONSES)
    async def segment(
        self,
        request: Request,
        output: str = Query("png", alias="format", description="png | overlay | json"),
        rle: bool = Query(False, description="json only: add a row-major run-length encoding"),
    ) -> Response:
        """Segment one image (multipart field ``image`` or the raw body)."""
        check_bearer(request, self.token)
        if output not in FORMATS:
            raise HTTPException(400, f"format must be one of {', '.join(FORMATS)}, got {output!r}")
        deadline = self.args.request_timeout_s  # from here on; waiting at the proxy is bounded by 503s
        try:
            async with asyncio.timeout(deadline):
                data = await read_image(request, self.args.max_body_bytes)
                try:
                    prepared = await asyncio.to_thread(
                        prepare, data, self.loaded.info.image_size, self.args.max_pixels, self.args.resize
                    )
                except ImageError as err:  # refused here, so it never reaches (or fails) a batch
                    raise HTTPException(400, str(err)) from None
                self.requests += 1
                answer = await self.predict_batch((prepared.model_input, prepared.box))
                return await asyncio.to_thread(render, output, prepared.image, answer, rle)
        except TimeoutError:
            raise HTTPException(504, f"not answered within request_timeout_s={deadline:g} s") from None

    @api.get("/healthz")
    def healthz(self) -> dict:
        """Liveness; open even when auth is on."""
        if self.loaded is None:
            raise HTTPException(503, "model not loaded")
        return {"status": "ok"}

    @api.get("/model")
    def describe(self, request: Request) -> dict:
        """The model this replica serves and its batching knobs."""
        check_bearer(request, self.token)
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
        check_bearer(request, self.token)
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
        # Past these, Serve's proxy answers 503 at once with this Retry-After: a bounded queue
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": {"retry_after_s": config.retry_after_s},
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,  # drain on delete/SIGTERM
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
