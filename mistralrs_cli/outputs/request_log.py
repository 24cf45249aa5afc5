"""--log FILE / --request-logging-file: every request, response and error as one JSON line."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..errors import UserError


class RequestLog:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        if self.path is not None:
            try:
                self.path.open("a", encoding="utf-8").close()
            except OSError as e:
                raise UserError(f"cannot write the request log {self.path} ({e.strerror}); "
                                "pass a writable path to --log.") from None

    def write(self, kind: str, body: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": time.time(), "kind": kind, "body": body}, ensure_ascii=False)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
