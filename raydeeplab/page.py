"""The page ``GET /`` of the Serve app serves: pick or drop an image, see its mask overlaid, a
legend of classes with their shares, and the request time. Core: no Ray.

It lives in ``static/index.html`` (plain HTML and JS, no build step, nothing fetched from
elsewhere: clusters are often offline) and calls the same ``POST /segment`` as any client.
The colours come from here, so the page shows exactly the masks' palette.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from raydeeplab.data.images import VOC_PALETTE

PALETTE_SLOT = "/*PALETTE*/[]"


@functools.cache
def page_html() -> str:
    """The page with the palette filled in (read once per process)."""
    text = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
    return text.replace(PALETTE_SLOT, json.dumps(VOC_PALETTE.tolist(), separators=(",", ":")))
