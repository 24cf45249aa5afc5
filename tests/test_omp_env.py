"""mistralrs_cli sets libgomp's spin count when it is imported, before torch (whose libgomp the
native kernels share) can load it: libgomp reads the variable once, at load."""
from __future__ import annotations

import os
import subprocess
import sys

CODE = "import os, mistralrs_cli; print(os.environ.get('GOMP_SPINCOUNT'))"


def _spincount(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", CODE], env=base | env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_spincount_set_on_import():
    assert _spincount() == "10000"


def test_user_settings_win():
    assert _spincount(GOMP_SPINCOUNT="5") == "5"
    assert _spincount(OMP_WAIT_POLICY="passive") == "None"

