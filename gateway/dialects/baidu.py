"""Baidu Qianfan (wenxinworkshop) Stable-Diffusion-XL and its OAuth token endpoint.

Routes: ``/rpc/2.0/…/text2image/sd_xl`` and ``/oauth/2.0/token``, which Baidu's SDKs call first.

Wire facts: shared/reference/api-dialects.md §2 and the Baidu sd_xl doc page (seed 004), which
wins on body fields, ranges, sizes and the 1-based ``index``. Errors are HTTP 200 with
``{"error_code", "error_msg"}``: Baidu's SDKs only refresh tokens and retry on that path.
"""

from __future__ import annotations

import re
import secrets
import string
import time
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, route
from msgspec import Meta

from auth.oauth import TokenServer
from gateway.dialects.base import Dialect
from gateway.disconnect import unless_disconnected
from gateway.errors import Failure, invalid
from gateway.wire import decode_json, json_response
from inference import GenerationRequest, GenerationResult

SD_XL_PATH = "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/sd_xl"
TOKEN_PATH = "/oauth/2.0/token"

#: From the seed page (the reference lists only the six ≤1024 sizes).
SIZES = ("768x768", "1024x1024", "1536x1536", "2048x2048", "1024x768", "2048x1536", "768x1024",
         "1536x2048", "1024x576", "2048x1152", "576x1024", "1152x2048")
SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LMS Karras", "DPM++ SDE",
            "DPM++ SDE Karras", "DPM2 a Karras", "Heun", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
            "DPM2", "DPM2 Karras", "DPM2 a", "LMS")
STYLES = ("Base", "3D Model", "Analog Film", "Anime", "Cinematic", "Comic Book", "Craft Clay",
          "Digital Art", "Enhance", "Fantasy Art", "Isometric", "Line Art", "Lowpoly", "Neonpunk",
          "Origami", "Photographic", "Pixel Art", "Texture")
MAX_SEED = 4294967295

# -- wire schemas ----------------------------------------------------------------------------


class SdxlRequest(msgspec.Struct, kw_only=True):
    """The sd_xl body. Unknown fields are ignored."""

    prompt: Annotated[str, Meta(max_length=1024)]
    negative_prompt: Annotated[str, Meta(max_length=1024)] | None = None
    size: str = "1024x1024"
    n: Annotated[int, Meta(ge=1, le=4)] = 1
    steps: Annotated[int, Meta(ge=10, le=50)] = 20
    sampler_index: str = "Euler a"
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    cfg_scale: Annotated[float, Meta(ge=0, le=30)] = 5.0
    style: str = "Base"
    user_id: str | None = None


class ImageData(msgspec.Struct, kw_only=True):
    """One entry of ``data``."""

    b64_image: str
    index: int
    object: str = "image"
    # imagegate: the seed this image was made with (Baidu's SDKs hand the body on as a dict).
    seed: int | None = None


class Usage(msgspec.Struct, kw_only=True):
    """Token estimate of the prompts."""

    prompt_tokens: int
    total_tokens: int


class SdxlResponse(msgspec.Struct, kw_only=True):
    """The success body."""

    id: str
    created: int
    data: list[ImageData]
    usage: Usage
    object: str = "image"


class ErrorBody(msgspec.Struct, kw_only=True):
    """Baidu's error envelope, always sent with HTTP 200."""

    error_code: int
    error_msg: str


class AccessTokenQuery(msgspec.Struct, kw_only=True):
    """The query string of sd_xl: the OAuth access token."""

    access_token: str


class TokenQuery(msgspec.Struct, kw_only=True):
    """The query string (or form body) of the token endpoint."""

    grant_type: str
    client_id: str
    client_secret: str


class TokenResponse(msgspec.Struct, kw_only=True):
    """A successful token response (errors: ``{"error", "error_description"}``)."""

    access_token: str
    expires_in: int
    refresh_token: str
    scope: str
    session_key: str
    session_secret: str


class TokenError(msgspec.Struct, kw_only=True):
    """The token endpoint's error body (HTTP 400, or 401 for a bad client)."""

    error: str
    error_description: str | None = None


# -- translation -----------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_ID_CHARS = string.ascii_lowercase + string.digits


def baidu_prompt_tokens(*texts: str) -> int:
    """Baidu's estimate: CJK characters + English words × 1.3, rounded (half up)."""
    cjk = sum(len(_CJK.findall(t)) for t in texts)
    words = sum(len(_WORD.findall(t)) for t in texts)
    return int(cjk + words * 1.3 + 0.5)


def _codes(failure: Failure) -> int:
    cause, code = failure.cause, failure.code
    if cause == "validation":
        return 336002 if code == "invalid_json" else 336003
    if cause == "too_large":
        return 336003
    if cause == "auth":
        return 111 if code == "expired" else 110
    if cause == "quota":
        return 17 if code == "daily" else 18
    if cause == "overload":
        return 336100
    if cause == "forbidden":
        return 336004
    if cause == "not_found":
        return 336005
    if cause == "method":
        return 336101
    return 336000


def _pick(value: str, allowed: tuple[str, ...], field: str) -> str:
    folded = {a.casefold(): a for a in allowed}
    found = folded.get(value.strip().casefold())
    if found is None:
        raise invalid(f"{field} must be one of: {', '.join(allowed)}; got {value!r}", field=field)
    return found


class BaiduDialect(Dialect):
    """Baidu Qianfan's Stable-Diffusion-XL API and its OAuth token endpoint."""

    name = "baidu"
    error_schema = ErrorBody
    errors_in_200 = True
    prefixes = ("/rpc/2.0/", "/oauth/2.0/")
    field_names: ClassVar[dict[str, str]] = {
        "width": "size", "height": "size", "guidance": "cfg_scale", "sampler": "sampler_index",
    }

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.token_server = TokenServer(ctx.keys, ctx.tokens)

    def route_handlers(self) -> list[Any]:
        """The token endpoint (GET and POST) and sd_xl."""
        opt = {"dialect": self.name}

        @route(TOKEN_PATH, http_method=["GET", "POST"], status_code=200,
               opt={**opt, "query_in": TokenQuery, "schema_out": TokenResponse,
                    "error_schema": TokenError,
                    "summary": "OAuth client-credentials token (Baidu API Key + Secret Key)"})
        async def token(request: Request) -> Response:
            return await self.token(request)

        @route(SD_XL_PATH, http_method=["POST"], status_code=200,
               opt={**opt, "kind": "generate", "schema_in": SdxlRequest,
                    "schema_out": SdxlResponse, "query_in": AccessTokenQuery,
                    "summary": "Stable Diffusion XL text to image"})
        async def sd_xl(request: Request) -> Response:
            return await self.sd_xl(request)

        return [token, sd_xl]

    # -- handlers --------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        """``/oauth/2.0/token``: client credentials in the query string or a form body."""
        form: dict[str, str] = {}
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and ctype.startswith("application/x-www-form-urlencoded"):
            form = {k: str(v) for k, v in (await request.form()).items()}
        status, body = self.token_server.token_response(
            request.method, str(request.url), request.scope.get("query_string", b"").decode(
                "latin-1"), form)
        if body.get("error") == "unsupported_grant_type":
            body.setdefault("error_description", "the only grant type supported is "
                            "client_credentials")
        headers = {"cache-control": "no-store", "pragma": "no-cache"}
        if body.get("error") == "invalid_client":
            status = 401
            headers["www-authenticate"] = 'Bearer realm="imagegate"'
        return Response(content=body, status_code=status, media_type="application/json",
                        headers=headers)

    async def sd_xl(self, request: Request) -> Response:
        """``POST …/text2image/sd_xl?access_token=…``."""
        principal = self.ctx.authenticate_token(request.query_params.get("access_token"),
                                                self.name)
        body = decode_json(await request.body(), SdxlRequest)
        canonical = self.to_canonical(body, principal.id)
        self.ctx.admit(principal)
        result = await unless_disconnected(request, self.ctx.engine.generate(canonical))
        tokens = baidu_prompt_tokens(body.prompt, body.negative_prompt or "")
        self.ctx.record_usage(principal, result, len(result.images), prompt_tokens=tokens)
        return json_response(self.to_response(result, tokens))

    def to_canonical(self, body: SdxlRequest, client_id: str) -> GenerationRequest:
        """Translate the wire request, checking the seed page's closed lists."""
        if not body.prompt.strip():
            raise invalid("prompt must not be empty", field="prompt")
        size = _pick(body.size, SIZES, "size")
        width, _, height = size.partition("x")
        sampler = _pick(body.sampler_index, SAMPLERS, "sampler_index")
        style = _pick(body.style, STYLES, "style")
        return GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or "",
            n=body.n,
            width=int(width),
            height=int(height),
            steps=body.steps,
            guidance=body.cfg_scale,
            sampler=self.ctx.engine.samplers.canonical_name(sampler),
            seed=body.seed,
            style=style,
            output_format="png",
            want_base64=True,
            client_id=client_id,
        )

    @staticmethod
    def to_response(result: GenerationResult, prompt_tokens: int) -> SdxlResponse:
        """The success body; ``index`` counts from 1, as on Baidu's doc page."""
        return SdxlResponse(
            id="as-" + "".join(secrets.choice(_ID_CHARS) for _ in range(10)),
            created=int(time.time()),
            data=[ImageData(b64_image=image.b64 or "", index=i, seed=image.seed)
                  for i, image in enumerate(result.images, 1)],
            usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{"error_code", "error_msg"}``, always HTTP 200 (Baidu's SDKs read errors there)."""
        message = failure.message
        if failure.field and failure.cause == "validation" and failure.field not in message:
            message = f"{failure.field}: {message}"
        if failure.cause == "quota":  # Baidu's own words, which its SDKs and users match on
            message = (f"Open api {'daily' if failure.code == 'daily' else 'qps'} request "
                       f"limit reached ({message})")
        return json_response(ErrorBody(error_code=_codes(failure), error_msg=message))


DIALECT = BaiduDialect
