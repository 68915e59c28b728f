"""lor2c-train: fine-tune with one YAML recipe, on N local processes or under torchrun/deepspeed/srun.

Under torchrun or the deepspeed launcher (RANK/WORLD_SIZE set) or an srun step with one task per rank
(SLURM_PROCID/SLURM_NTASKS), every process is one rank.

    lor2c-train --config launcher/configs/minilm_lor2c.yaml [--set key=value ...]

Without a launcher's environment (RANK/WORLD_SIZE), it starts `nproc` local processes itself through
torch.distributed.run. Bad input is reported once, before any process starts or any file is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

PREFLIGHT_DONE = "LOR2C_PREFLIGHT_DONE"
PREFLIGHT_GATE = "LOR2C_PREFLIGHT_GATE"  # "<verdict file>:<launcher pid>", for ranks started beside pre-flight


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="lor2c-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML training recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, dotted for sections (adapter.r=4); repeatable")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def preflight(cfg, env=os.environ) -> None:
    """Every check that needs no process group: paths, model files, architecture, adapter fit, DeepSpeed
    JSON, world size and batch, data, event schedule, evaluation sets, output dir and resume checkpoint."""
    from lor2c_ds import engine
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.checkpoint import check_resume, latest_complete
    from lor2c_ds.config import model_kind
    from lor2c_ds.data import prepare_data
    from lor2c_ds.evaluation import EvalDataError, check_chat_rows, load_eval_sets, metric_names
    from lor2c_ds.registry import UnsupportedArchitectureError, check_adaptable

    from . import preflight_checks as checks

    checks.check_paths(cfg)
    model_dir = Path(cfg.model)
    model_config = checks.read_model_config(model_dir)
    try:
        check_adaptable(model_config, model_kind(cfg.task), cfg.adapter)  # block stack, targets, fused splits
    except UnsupportedArchitectureError as e:
        raise ConfigError(str(e)) from None
    heads = [a for a in (model_config.architectures or []) if a.endswith("ForSequenceClassification")]
    if heads and model_kind(cfg.task) == "classification" and model_config.num_labels != cfg.num_labels:
        raise ConfigError(f"model {model_dir} has a classification head of {model_config.num_labels} labels, "
                          f"the recipe asks for num_labels={cfg.num_labels}; start from the base model instead")
    cfg.adapter.validate(num_blocks=model_config.num_hidden_layers, hidden=model_config.hidden_size)
    checks.check_weights(model_dir)
    checks.check_adapters_attach(cfg, model_config)
    world, source = checks.planned_world_size(cfg, env)
    checks.check_batch(cfg, world, source)
    tokenizer = checks.load_tokenizer_checked(model_dir)
    engine.build_ds_config(cfg, world, 1)  # the JSON and the keys the recipe owns; steps only shape the schedule
    try:
        scored = load_eval_sets(cfg.eval.multiple_choice_path, cfg.eval.generation_path, cfg.eval.max_examples)
    except EvalDataError as e:
        field = "eval.multiple_choice_path" if cfg.eval.multiple_choice_path and cfg.eval.multiple_choice_path \
            in str(e) else "eval.generation_path"
        raise ConfigError(f"{field}: {e}") from None
    known = metric_names(cfg.task, bool(cfg.eval.multiple_choice_path), bool(cfg.eval.generation_path))
    if cfg.eval.best_metric and cfg.eval.best_metric not in known:
        raise ConfigError(f"eval.best_metric {cfg.eval.best_metric!r} is not reported for task {cfg.task}; "
                          f"choose one of {sorted(known)}")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        if not (cfg.resume and latest_complete(out / "checkpoints")):
            raise ConfigError(f"output_dir {out} is not empty and holds no complete checkpoint to resume from; "
                              "choose another or set overwrite_output_dir=true")
    try:
        check_resume(cfg)  # the checkpoint it resumes from fits the recipe and is whole
    except ConfigError:
        raise
    except (OSError, ValueError):
        pass  # an unreadable run state: the next check names it
    checks.check_resume(cfg)  # older checkpoints: the recipe recorded in train_config.json
    data = prepare_data(cfg, tokenizer)  # every data error, before any rank starts
    try:  # after prepare_data, which gives a chat task's tokenizer data.chat_template
        check_chat_rows(tokenizer, scored["multiple_choice"] or [])
    except EvalDataError as e:
        raise ConfigError(f"eval.multiple_choice_path {cfg.eval.multiple_choice_path}: {e}") from None
    checks.check_lengths(cfg, model_config, data)
    checks.check_labels(cfg, data)
    checks.check_schedule(cfg, data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(nproc: int, argv: list[str], nodes: list[str] | None = None) -> int:
    """Re-run this command on `nproc` local ranks through torch.distributed.run (`nodes`: its
    multi-node arguments, for one launcher task per SLURM node)."""
    return start_local(nproc, argv, nodes).wait()


def start_local(nproc: int, argv: list[str], nodes: list[str] | None = None,
                gate: Path | None = None) -> subprocess.Popen:
    """Start torch.distributed.run on `nproc` local ranks; with `gate`, the ranks import what they need
    and then wait, silent, for pre-flight's verdict in that file (`open_gate`)."""
    import signal

    nodes = nodes or ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    # launcher.ranks: torch.distributed.run, without its own report of a failure the failing rank has told
    cmd = [sys.executable, "-m", "launcher.ranks", *nodes, f"--nproc_per_node={nproc}",
           "-m", "launcher.train", *argv]
    # OMP_NUM_THREADS: torchrun's own default (1), set here so that it prints no banner about it
    env = dict(os.environ, **{PREFLIGHT_DONE: "1"}, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if gate is not None:
        env[PREFLIGHT_GATE] = f"{gate}:{os.getpid()}"
    # torchrun starts each rank in a session of its own, so a signal sent to this process or its group
    # never reaches them. Inside an srun step SLURM signals every process of the step itself; elsewhere
    # SIGUSR1 and SIGTERM are handed to the ranks as SIGUSR1 (they stop after the same step with a
    # checkpoint), never to torchrun, which would kill them on SIGTERM. This process reports the exit code.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # torchrun inherits it ignored
    child = subprocess.Popen(cmd, env=env)
    in_step = "SLURM_STEP_ID" in os.environ

    def forward(signum, frame):
        if not in_step:
            for pid in _children(child.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    return child


def open_gate(gate: Path, ranks: subprocess.Popen, passed: bool) -> None:
    """Hand pre-flight's verdict to the waiting ranks. On a failure they have done nothing but import:
    stop torchrun (so that it starts no more), kill its ranks and reap it, at once."""
    import signal

    tmp = gate.with_suffix(".tmp")
    tmp.write_text("ok" if passed else "fail")
    os.replace(tmp, gate)
    if passed:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ranks.pid, signal.SIGSTOP)
        for pid in _children(ranks.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.kill(ranks.pid, signal.SIGKILL)
    ranks.wait()
    shutil.rmtree(gate.parent, ignore_errors=True)


def wait_for_preflight(gate_env: str) -> bool:
    """In a rank started beside pre-flight: import the training stack (the slow part of a start) with
    stdout and stderr silenced, then wait for the verdict; False when pre-flight failed (or its
    process is gone), and the rank leaves without a word."""
    import time

    path, _, launcher_pid = gate_env.rpartition(":")
    gate = Path(path)
    saved = [os.dup(1), os.dup(2)]
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    try:
        import lor2c_ds.train  # noqa: F401  (torch, transformers, DeepSpeed)
        from lor2c_ds import engine, preemption  # noqa: F401

        preemption.install()  # a signal during pre-flight stops the run after its first step

        while not gate.exists():
            try:
                os.kill(int(launcher_pid), 0)
            except ProcessLookupError:
                return False
            time.sleep(0.05)
        return gate.read_text().strip() == "ok"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, quiet):
            os.close(fd)


def _children(pid: int) -> list[int]:
    """The direct child processes of `pid`, from /proc (torchrun's children are the ranks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def slurm_node_launcher_args(env=os.environ) -> list[str]:
    """torchrun's arguments for this node when srun runs one launcher task per node
    (LOR2C_SLURM_TASKS=per_node): node rank from SLURM_NODEID, rendezvous as in slurm_environment."""
    master = slurm_environment(dict(env, SLURM_NTASKS="2"))
    return [f"--nnodes={env['SLURM_NNODES']}", f"--node_rank={env['SLURM_NODEID']}",
            f"--master_addr={master['MASTER_ADDR']}", f"--master_port={master['MASTER_PORT']}"]


def slurm_environment(env=os.environ) -> dict[str, str]:
    """torch.distributed's variables from an srun step (one task per rank), or {} outside one.

    The rendezvous host is the allocation's first node (its NodeAddr as SLURM knows it), the port is
    derived from the job id so concurrent jobs on shared nodes do not collide; both can be preset."""
    if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2 or "SLURM_STEP_ID" not in env:
        return {}
    found = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
             "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
             "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))}
    if "MASTER_ADDR" in env:
        found["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        first = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True,
                               capture_output=True, text=True).stdout.split()[0]
        node = subprocess.run(["scontrol", "show", "node", first], check=True, capture_output=True,
                              text=True).stdout
        addr = next((f.split("=", 1)[1] for f in node.split() if f.startswith("NodeAddr=")), first)
        found["MASTER_ADDR"] = addr
    return found


def worker(cfg) -> int:
    import warnings

    # torch deprecates the collective names DeepSpeed still calls, once per call: keep the log readable
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    from lor2c_ds import engine, preemption
    from lor2c_ds.train import run

    from .rank_failure import exit_after_failure

    rank = int(os.environ.get("RANK", 0))
    if rank != 0 or os.environ.get(PREFLIGHT_DONE):  # pre-flight has said the data warnings once
        logging.getLogger("lor2c_ds.data").setLevel(logging.ERROR)
    try:
        preemption.install()  # SIGUSR1/SIGTERM: stop at the next step boundary with a checkpoint
        rank, world = engine.init_distributed()
        results = run(cfg, rank, world)
        if rank == 0 and preemption.stopped_at() is None:
            report(cfg, results)
        engine.shutdown()
    except Exception as e:  # one line from the first failing rank; the others leave quietly, at once
        exit_after_failure(e, rank, cfg.output_dir)
    if preemption.stopped_at() is not None:
        return preemption.finish(rank, cfg.output_dir)  # rank 0 requeues a SLURM job
    if rank == 0 and cfg.export_on_save:  # the job's end would kill them: the exports finish first
        from lor2c_ds.export import wait_for_exports

        failed = wait_for_exports()
        if failed:
            logs = ", ".join(f"{tag}: {log_file}" for tag, log_file in failed)
            print(f"lor2c-train: error: {len(failed)} export(s) failed (logs: {logs})", file=sys.stderr)
            return 1
    return 0


def report(cfg, results: dict) -> None:
    print(results["trainable"])
    metric = {"classification": "accuracy", "regression": "pearson"}.get(cfg.task, "perplexity")
    before, after = results.get("before"), results["after"]
    line = f"held-out {metric}: "
    if before:
        line += f"untuned {before[metric]:.4f} -> "
    print(line + f"fine-tuned {after[metric]:.4f} ({results['steps']} steps, adapter in "
          f"{Path(cfg.output_dir) / 'adapter'})")
    print(json.dumps({"before": before, "after": after}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.config import load_config
    from lor2c_ds.data import DataError

    per_node = os.environ.get("LOR2C_SLURM_TASKS") == "per_node" and "SLURM_STEP_ID" in os.environ
    if "RANK" not in os.environ and not per_node:
        os.environ.update(slurm_environment())
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    is_rank0 = os.environ.get("RANK", "0") == "0"
    gate_env = os.environ.pop(PREFLIGHT_GATE, None) if launched else None
    if gate_env and not wait_for_preflight(gate_env):
        return 0  # pre-flight failed and said why; this rank did nothing
    ranks = gate = None
    try:
        cfg = load_config(args.config, args.overrides)
        if not os.environ.get(PREFLIGHT_DONE) and is_rank0:
            if not launched and not per_node and cfg.nproc > 1:
                # the ranks start (and import torch, transformers, DeepSpeed) while pre-flight runs
                gate = Path(tempfile.mkdtemp(prefix="lor2c_preflight_")) / "verdict"
                ranks = start_local(cfg.nproc, argv, gate=gate)
            preflight(cfg)
            os.environ[PREFLIGHT_DONE] = "1"  # this process's rank, if any, need not say its warnings again
    except (ConfigError, DataError) as e:
        print(f"lor2c-train: error: {e}", file=sys.stderr)
        if ranks is not None:
            open_gate(gate, ranks, passed=False)
        return 2
    except BaseException:
        if ranks is not None:
            open_gate(gate, ranks, passed=False)
        raise
    if launched:
        return worker(cfg)
    if ranks is not None or per_node or cfg.nproc > 1:  # per_node: this srun task starts the node's ranks
        if ranks is not None:
            open_gate(gate, ranks, passed=True)
            code = ranks.wait()
            shutil.rmtree(gate.parent, ignore_errors=True)
        else:
            code = spawn_local(cfg.nproc, argv, slurm_node_launcher_args() if per_node else None)
        # This process only waited for its ranks: leave without interpreter teardown, during which a
        # library thread left by pre-flight crashed it once (SIGSEGV in libpython after a complete run).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    return worker(cfg)


if __name__ == "__main__":  # a rank (torchrun runs `-m launcher.train`) or `python -m launcher.train`
    exit_code = main()
    # Everything is written and closed, the process group destroyed: skip the interpreter's teardown
    # of torch, DeepSpeed and transformers (seconds per rank).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code or 0)
