"""A rank that fails says so once: the first failing rank prints one line naming the cause and a log
file (in the output directory) with the full traceback; the other ranks leave without a word, with the
same exit code (2 for a configuration or data error, 1 otherwise), and nobody waits for a collective.

A rank killed by a signal (the OOM killer, kill -9) cannot say anything: the first to notice is a
survivor whose collective lost its peer. Under lor2c-train's own launcher (`launcher.ranks`, which
sees the signal) that survivor leaves its line in the file named by LOR2C_FAILURE_NOTE instead of
printing it, and the launcher prints one line naming the killed rank, or the note when none was killed."""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path


def config_error_types() -> tuple[type, ...]:
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.data import DataError
    from lor2c_ds.evaluation import EvalDataError

    return ConfigError, DataError, EvalDataError


def traceback_log(error: BaseException, rank: int, output_dir: str) -> Path:
    """Write the traceback to OUTPUT_DIR/error_rank{rank}.log (a temporary directory when that cannot be
    written) and return the file."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    for directory in (Path(output_dir), Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"error_rank{rank}.log"
            path.write_text(text)
            return path.absolute()
        except OSError:
            continue
    raise error


def failure_line(error: BaseException, rank: int, log_path: Path) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, config_error_types()):
        return f"lor2c-train: error: {message} (rank {rank}; traceback in {log_path})"
    return f"lor2c-train: error: rank {rank} failed: {type(error).__name__}: {message} (traceback in {log_path})"


FAILURE_NOTE = "LOR2C_FAILURE_NOTE"  # set by launcher.ranks: where a survivor's line waits
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "remote process exited", "communicator was aborted", "socket timeout")


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank went away (gloo, NCCL)."""
    message = str(error).lower()  # torch.distributed's DistNetworkError and DistBackendError are RuntimeErrors
    return isinstance(error, RuntimeError) and any(m in message for m in _PEER_LOST)


def exit_after_failure(error: BaseException, rank: int, output_dir: str) -> None:
    """Report `error` once for the whole job and end this process at once, without interpreter
    teardown (its process group may be blocked on a rank that is gone)."""
    from lor2c_ds.engine import first_to_fail

    code = 2 if isinstance(error, config_error_types()) else 1
    first, code = first_to_fail(code)
    if first:
        line = failure_line(error, rank, traceback_log(error, rank, output_dir))
        note = os.environ.get(FAILURE_NOTE)
        if note and lost_a_peer(error):  # the launcher knows more: whether that peer was killed
            Path(note).write_text(line + "\n")
        else:
            _say(line)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(line: str) -> None:
    """One line on stderr, after any progress bar of this process (tqdm leaves its line open)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
