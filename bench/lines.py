"""Result lines of the benches: one JSON object per line, printed and appended under ``$OUT``.

Appended as they come, so a run cut short (a device call's time limit) still leaves what it
measured.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "/tmp/gpuout")


def emit(file: str, record: Mapping[str, object]) -> None:
    """Print ``record`` as one JSON line and append it to ``$OUT/<file>``."""
    line = json.dumps(record)
    print(line, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / file, "a") as f:
        f.write(line + "\n")
