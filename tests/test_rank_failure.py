"""A failing rank says it once: one line from the first failing rank naming the cause and a log file in
the output directory with the traceback; the other ranks leave without theirs, at once; exit code 2 for
a configuration or data error found inside a rank, 1 for any other error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_cli_errors import GOOD_CSV, PREFIX, REPO, _tiny_model_dir

PROBE = """
import sys
from launcher.rank_failure import exit_after_failure
from lor2c_ds.adapters.config import ConfigError
error = ConfigError("adapter.r must be a positive integer, got 0") if sys.argv[1] == "config" else RuntimeError("boom")
try:
    raise error
except Exception as e:
    exit_after_failure(e, 1, sys.argv[2])
"""


@pytest.mark.parametrize("kind,code", [("config", 2), ("runtime", 1)])
def test_failure_line_log_and_exit_code(tmp_path, kind, code):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    log_file = out / "error_rank1.log"
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    line = proc.stderr.strip()
    assert line.startswith(PREFIX) and str(log_file) in line
    assert ("adapter.r must be a positive integer, got 0 (rank 1;" in line) if kind == "config" else \
        ("rank 1 failed: RuntimeError: boom" in line)
    assert "Traceback (most recent call last)" in log_file.read_text()


# Loaded by every Python process of the run (PYTHONPATH); on the rank named by LOR2C_TEST_FAIL_RANK it
# makes the data preparation raise, while the other ranks go on into the collective that follows it.
SITECUSTOMIZE = """
import os
if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("LOR2C_TEST_FAIL_RANK"):
    import lor2c_ds.train

    def failing_prepare_data(*args, **kwargs):
        raise RuntimeError("injected failure while preparing the data")

    lor2c_ds.train.prepare_data = failing_prepare_data
"""


@pytest.mark.slow
def test_one_rank_fails_two_ranks_say_it_once(tmp_path):
    model_dir = _tiny_model_dir(tmp_path)
    (tmp_path / "train.csv").write_text(GOOD_CSV)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    out = tmp_path / "out"
    recipe = {"model": str(model_dir), "data": {"path": str(tmp_path / "train.csv"), "format": "csv", "max_length": 4},
              "adapter": {"method": "lor2c", "r": 4}, "output_dir": str(out), "nproc": 2, "max_steps": 2,
              "global_batch_size": 4, "micro_batch_size": 2, "eval_before": False}
    config = tmp_path / "recipe.yaml"
    config.write_text(json.dumps(recipe))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOR2C_PREFLIGHT_DONE")}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), LOR2C_TEST_FAIL_RANK="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf"), LOR2C_DIST_TIMEOUT_S="600")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.train", "--config", str(config)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, said_at = [], None
    for line in proc.stderr:  # the ranks start slowly (DeepSpeed builds its CPU ops): time from the failure on
        lines.append(line.rstrip("\n"))
        if said_at is None and line.startswith(PREFIX):
            said_at = time.monotonic()
    proc.wait(timeout=900)
    ended_after = time.monotonic() - (said_at or 0.0)
    stderr = "\n".join(lines)
    detail = f"rc={proc.returncode}, ended {ended_after:.0f} s after the error line\nstderr:\n{stderr[-5000:]}"
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert proc.returncode == 1, detail
    assert len(errors) == 1, detail
    assert "rank 1 failed: RuntimeError: injected failure while preparing the data" in errors[0], detail
    assert f"traceback in {out / 'error_rank1.log'}" in errors[0], detail
    assert "Traceback" not in stderr, detail  # neither rank's nor torchrun's
    assert "Traceback (most recent call last)" in (out / "error_rank1.log").read_text()
    assert not (out / "error_rank0.log").exists()
    assert said_at is not None and ended_after < 120, detail  # rank 0 left its collective at once, not after 600 s
    # the truncation warning: once, from pre-flight, not again from each rank
    truncated = [line for line in lines if "train split" in line and "truncated" in line]
    assert len(truncated) == 1, detail


def test_a_killed_rank_is_named_once_by_the_launcher():
    """torchrun's failures -> the one line: a rank killed by a signal is named (the survivor that lost its
    connection left only a note); without one, the survivor's note, or nothing when a rank spoke itself."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launcher.rank_failure import lost_a_peer
    from launcher.ranks import failure_report

    survivor = ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file="/nonexistent")
    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file="/nonexistent")
    note = "lor2c-train: error: rank 0 failed: RuntimeError: Connection closed by peer (traceback in x)"
    line, code = failure_report({0: survivor, 1: killed}, note)
    assert line == "lor2c-train: error: rank 1 (pid 101) was killed by SIGKILL; the other ranks stopped"
    assert code == 137
    assert failure_report({0: survivor}, note) == (note, 1)
    assert failure_report({0: survivor}, "") == (None, 1)  # the failing rank printed its own line
    bad_input = ProcessFailure(local_rank=0, pid=100, exitcode=2, error_file="/nonexistent")
    assert failure_report({0: bad_input}, "") == (None, 2)
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:53427")
    assert lost_a_peer(gloo) and lost_a_peer(RuntimeError("Read error: Connection reset by peer"))
    assert not lost_a_peer(RuntimeError("boom")) and not lost_a_peer(ValueError("Connection closed by peer"))
