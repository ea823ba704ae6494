"""Process-wide logging set-up: plain text for people, JSON lines for log pipelines.

Every line goes through the one root handler configured here: uvicorn's (``log_config=None``),
Litestar's (the app is built with ``logging_config=None``) and the libraries' (diffusers and
transformers install their own handlers, which are removed so their records reach the root).
"""

from __future__ import annotations

import json
import logging
import time

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")

# diffusers logs the part of a prompt CLIP cut off (at WARNING, so a 3 MB prompt landed in the
# log); transformers warns about long token sequences. Prompt text never goes to the log.
_PROMPT_ECHOES = ("truncated because CLIP", "Token indices sequence length")


class PromptRedactor(logging.Filter):
    """Replaces library messages that quote prompt text with a fixed one."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place when it would quote a prompt; never drop it."""
        if record.name.startswith(("diffusers", "transformers")):
            text = str(record.msg)
            if any(marker in text for marker in _PROMPT_ECHOES):
                record.msg = ("a prompt is longer than the text encoder reads (77 tokens); "
                              "the rest was ignored (prompt text is not logged)")
                record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger and message (and structured fields)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, for the CLI.

    diffusers', transformers' and torch's loggers are left to :func:`route_library_logs`:
    importing them takes seconds, and a start-up refusal (a bad keys file, a busy port) should
    not wait for that.
    """
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PromptRedactor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _quiet("httpx")
    # uvicorn's loggers keep whatever handlers an earlier set-up gave them; send them to root.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True


def _quiet(*names: str) -> None:
    """Third-party chatter says nothing to an operator: warnings and up, or the root's level."""
    level = max(logging.WARNING, logging.getLogger().level)
    for name in names:
        logging.getLogger(name).setLevel(level)


def route_library_logs() -> None:
    """Send diffusers', transformers' and torch's records to the root handler, not their own.

    Call after :func:`configure_logging` and before the model loads (it imports all three).
    """
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - both are dependencies
        return
    for lib in (dlog, tlog):
        lib.disable_default_handler()
        lib.enable_propagation()
    # After their import, which sets their own default level.
    _quiet("diffusers", "transformers")
    # torch installs its own glog-style handler on the "torch" logger when it is imported (its
    # warnings and torch.compile's messages would bypass the JSON format): take it over too.
    import torch  # noqa: F401 - the server imports it anyway; its handler exists from here on

    torch_logger = logging.getLogger("torch")
    torch_logger.handlers[:] = []
    torch_logger.propagate = True
