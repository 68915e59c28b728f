"""Starts lor2c-train's local ranks: torch.distributed.run without its own failure report (the failing
rank has said why, once). Exit code: the failing ranks' own code (2: bad input, 1: any other error)."""
from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        own = [f.exitcode for f in failures if f.exitcode > 0]  # a code a rank chose, not a signal's
        code = own[0] if own else failures[0].exitcode
        return code if code >= 0 else 128 - code
    return 0


if __name__ == "__main__":
    sys.exit(main())
