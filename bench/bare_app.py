"""A bare Litestar app with the same route and a cached response: the overhead baseline.

Run: python -m bench.bare_app PORT.
"""

from __future__ import annotations

import base64
import io
import sys
import time

import numpy as np
import uvicorn
from litestar import Litestar, Request, Response, post
from PIL import Image

_rng = np.random.default_rng(0)
_img = Image.fromarray((_rng.random((64, 64, 3)) * 255).astype("uint8"))
_buf = io.BytesIO()
_img.save(_buf, format="PNG", compress_level=1)
B64 = base64.b64encode(_buf.getvalue()).decode()


@post("/v1/images/generations", status_code=200)
async def generations(request: Request) -> Response:
    """Read the body, answer the cached image."""
    await request.json()
    return Response(content={"created": int(time.time()), "data": [{"b64_json": B64}]})


app = Litestar(route_handlers=[generations], openapi_config=None)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
