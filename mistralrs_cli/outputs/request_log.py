"""--log FILE / --request-logging-file: every request, response and error as one JSON line.

A log that stops being writable (a full disk, a removed mount) is reported once on stderr and
switched off: requests are still answered."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import UserError


class RequestLog:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()  # whole lines: writers are the event loop and worker threads
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
        with self._lock:
            if self.path is None:  # switched off by another writer meanwhile
                return
            try:
                # backslashreplace: a lone surrogate (JSON allows "\ud800") is no reason to fail
                with self.path.open("a", encoding="utf-8", errors="backslashreplace") as f:
                    f.write(line + "\n")
            except OSError as e:
                print(f"warning: cannot write the request log {self.path} ({e.strerror or e}); "
                      "request logging is off from now on.", file=sys.stderr, flush=True)
                self.path = None
