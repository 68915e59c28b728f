"""Starts lor2c-train's local ranks: torch.distributed.run without its own failure report (the failing
rank has said why, once). A rank killed by a signal could not: this launcher names it, in one line, and
the survivor that lost its connection to it stays silent (`launcher.rank_failure`). Exit code: the
failing ranks' own code (2: bad input, 1: any other error), else 128 + the signal's number."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from .rank_failure import FAILURE_NOTE


def failure_report(failures: dict, note: str) -> tuple[str | None, int]:
    """(the line to print, if no rank printed one; the exit code) from torchrun's failures
    ({global rank: ProcessFailure}) and the note a survivor left."""
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)
    killed = [(rank, f) for rank, f in ordered if f.exitcode < 0]
    own = [f.exitcode for _, f in ordered if f.exitcode > 0]  # a code a rank chose, not a signal's
    if killed:
        rank, f = killed[0]
        return (f"lor2c-train: error: rank {rank} (pid {f.pid}) was killed by {f.signal_name()}; the other "
                f"ranks stopped", 128 + abs(f.exitcode))
    code = own[0] if own else ordered[0][1].exitcode
    return note or None, code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    fd, note_path = tempfile.mkstemp(prefix="lor2c_failure_")
    os.close(fd)
    os.environ[FAILURE_NOTE] = note_path  # the ranks inherit it
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        line, code = failure_report(e.failures, Path(note_path).read_text().strip())
        if line:
            print("\n" + line, file=sys.stderr)  # after the progress bar rank 0 left open
        return code
    finally:
        Path(note_path).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
