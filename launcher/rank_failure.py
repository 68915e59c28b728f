"""A rank that fails says so once: the first failing rank prints one line naming the cause and a log
file (in the output directory) with the full traceback; the other ranks leave without a word, with the
same exit code (2 for a configuration or data error, 1 otherwise), and nobody waits for a collective."""
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


def exit_after_failure(error: BaseException, rank: int, output_dir: str) -> None:
    """Report `error` once for the whole job and end this process at once, without interpreter
    teardown (its process group may be blocked on a rank that is gone)."""
    from lor2c_ds.engine import first_to_fail

    code = 2 if isinstance(error, config_error_types()) else 1
    first, code = first_to_fail(code)
    if first:
        print(failure_line(error, rank, traceback_log(error, rank, output_dir)), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
