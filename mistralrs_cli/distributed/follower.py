"""`python -m mistralrs_cli.distributed.follower SPEC.pickle`: a rank that rank 0 started on
this host (comm.spawn). It loads the same model, shards it, and follows rank 0's steps."""
from __future__ import annotations

import logging
import os
import pickle
import signal
import sys


def main(path: str) -> None:
    with open(path, "rb") as f:
        spec, opts, level = pickle.load(f)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops this rank
    from ..errors import UserError
    from ..loaders.load import load
    from .comm import USER_ERROR_STATUS

    try:
        load(spec, opts)  # returns only on rank 0
    except UserError:
        os._exit(USER_ERROR_STATUS)  # rank 0 loads the same and says it


if __name__ == "__main__":
    main(sys.argv[1])
