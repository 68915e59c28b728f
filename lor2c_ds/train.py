"""The fine-tuning recipe: config -> model + adapters -> engine -> training loop -> adapter checkpoint.

Runs on every rank of an initialised process group. Rank 0 writes the logs (TensorBoard,
`metrics.jsonl`) and shows the progress bar; every rank takes part in every collective.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from . import checkpoint, preemption
from . import engine as ds
from .adapters import apply_adapters, save_adapters, trainable_summary
from .adapters.config import ConfigError
from .registry import find_blocks, spec_for
from .callbacks import Callback
from .preemption import PreemptionCallback
from .config import TrainConfig, model_kind
from .evaluation import (check_chat_rows, evaluate, evaluate_sets, load_eval_sets, metric_direction,
                         scored_labels, summed_loss)
from .data import PreparedData, StreamShard, eval_loader, model_inputs, prepare_data, stream_loader, train_loader

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_backbone(cfg: TrainConfig, ds_config: dict):
    """The pretrained model in the training precision (a bf16 checkpoint is upcast for fp32 training),
    partitioned while it loads under ZeRO-3. `model.newly_initialised` lists the modules whose weights
    the checkpoint lacks (transformers initialised them at random), shortest names first."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    with ds.zero3_loading(ds_config):
        if model_kind(cfg.task) == "classification":
            model, info = AutoModelForSequenceClassification.from_pretrained(
                cfg.model, num_labels=cfg.num_labels, dtype=dtype, output_loading_info=True)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, output_loading_info=True)
    model.newly_initialised = whole_modules(model, info["missing_keys"])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if cfg.activation_checkpointing:  # recompute each block in backward; the adapter hooks stay outside
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def whole_modules(model: torch.nn.Module, names) -> list[str]:
    """The outermost modules all of whose parameters are among `names` (e.g. transformers' missing keys)."""
    names = set(names)
    found: list[str] = []
    for prefix, module in model.named_modules():
        params = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
        if prefix and params and all(p in names for p in params) and not any(
                prefix.startswith(f"{f}.") for f in found):
            found.append(prefix)
    return found


def never_trained(model: torch.nn.Module, skip: list[str]) -> list[str]:
    """Linear modules outside `skip` whose bias is exactly zero in every entry: shipped as initialised
    (e.g. the pooler of a sentence-transformers checkpoint, trained with mean pooling), since no
    training step leaves every bias at 0. Gathered under ZeRO-3 (every rank walks the same modules)."""
    candidates = {name: module.bias for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and module.bias is not None and not _within(name, skip)}
    with ds.gathered(list(candidates.values())):  # one gather for all of them
        return [name for name, bias in candidates.items() if not torch.count_nonzero(bias)]


def _within(name: str, prefixes) -> bool:
    """`name` is one of the modules `prefixes` or inside one of them."""
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def load_model(cfg: TrainConfig, ds_config: dict):
    """The backbone with the recipe's adapters attached.

    A module the checkpoint lacks (a classification head's pooler, say), or ships as never trained
    (`never_trained`), is trained with the head, so that the head never reads through frozen random
    weights; `adapter.modules_to_save` overrides."""
    model = load_backbone(cfg, ds_config)
    heads = [h for h in spec_for(model).heads if hasattr(model, h)]
    new = [m for m in model.newly_initialised if not _within(m, heads)]
    blocks = find_blocks(model, spec_for(model))
    stack = next(name for name, module in model.named_modules() if module is blocks)
    inside = [m for m in new if m.startswith(f"{stack}.")]
    if inside:
        raise ConfigError(f"model {cfg.model}: the checkpoint lacks weights of {inside[:3]} inside the block stack; "
                          "it does not match its config")
    untrained = never_trained(model, [stack, *heads, *model.newly_initialised])
    why = {**{m: "not in the checkpoint (initialised at random)" for m in new},
           **{m: "in the checkpoint as initialised (its bias is exactly 0)" for m in untrained}}
    said_by_this_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for reason in dict.fromkeys(why.values()) if said_by_this_rank else ():  # said once, by rank 0
        names = [m for m in why if why[m] == reason]
        size = sum(getattr(p, "ds_numel", 0) or p.numel() for m in names for p in model.get_submodule(m).parameters())
        if cfg.adapter.modules_to_save is None:
            log.info("%s %s: trained with the head, %s parameters; adapter.modules_to_save overrides",
                     ", ".join(names), reason, f"{size:,d}")
        elif frozen := [m for m in names if m not in cfg.adapter.modules_to_save]:
            log.warning("%s %s and left frozen by adapter.modules_to_save", ", ".join(frozen), reason)
    adapter = cfg.adapter  # the recipe stays as written: a resume compares it with the checkpoint's
    if why and adapter.modules_to_save is None:
        adapter = dataclasses.replace(adapter, modules_to_save=heads + list(why))
    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    return apply_adapters(model, adapter)


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class MetricsLog:
    """`metrics.jsonl` and TensorBoard, written by rank 0 only."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def event(self, step: int, kind: str, payload: dict) -> None:
        """A structured event: a line in metrics.jsonl and a text entry in TensorBoard."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "kind": kind, **payload}) + "\n")
            self.tb.add_text(kind, json.dumps(payload), step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


@dataclass
class RunState:
    """What the loop and its callbacks share. A callback may replace `engine` (and must keep it valid)."""

    cfg: TrainConfig
    engine: object
    rank: int
    world: int
    metrics: "MetricsLog | None"
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    stop: bool = False  # set by a callback to end the loop after this step
    callbacks: list[Callback] = field(default_factory=list)
    label_names: list[str] | None = None  # classification: saved with every checkpoint
    best: dict | None = None  # {"metric", "value", "step", "tag"} of the best evaluation so far
    last_saved_step: int | None = None
    run_id: str = ""  # kept across resumes; retention only deletes this run's checkpoints
    data: "PreparedData | None" = None  # the prepared splits, for callbacks that evaluate (prepared once)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def run_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "world": self.world, "label_names": self.label_names,
                "recipe": checkpoint.recipe_identity(self.cfg),
                "best": self.best, "run_id": self.run_id, "job": checkpoint.job_identity(),
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}}

    def saved_at_step(self) -> bool:
        return self.last_saved_step == self.step

    def record_eval(self, values: dict) -> None:
        """Log an evaluation; with eval.best_metric, checkpoint it when it is the best so far."""
        self.metrics.write(self.step, "eval", values)
        name = self.cfg.eval.best_metric
        if not name:
            return
        if name not in values:
            raise KeyError(f"eval.best_metric {name!r} is not among the evaluation's metrics {sorted(values)}")
        mode = metric_direction(name, self.cfg.eval.best_mode)
        value = values[name]
        if self.best is not None and not (value > self.best["value"] if mode == "max" else value < self.best["value"]):
            return
        self.best = {"metric": name, "value": value, "step": self.step, "tag": f"step_{self.step}"}
        self.save_checkpoint()  # run_state.json records it as the best
        if self.rank == 0:
            checkpoint.mark_best(self.output_dir / "checkpoints", self.best)
        self.metrics.event(self.step, "best", self.best)

    def save_checkpoint(self, export: bool = True) -> Path:
        root = self.output_dir / "checkpoints"
        protect = self.best["tag"] if self.best else None
        tag_dir = checkpoint.save(self.engine, root, f"step_{self.step}", self.run_state(), self.rank,
                                  keep=self.cfg.keep_checkpoints, protect=protect)
        self.last_saved_step = self.step
        if export and self.cfg.export_on_save:  # a merged, consolidated copy in output_dir/export
            from .export import export_run_checkpoint

            export_run_checkpoint(self.cfg, tag_dir, self.rank)
        return tag_dir


def _real_tokens(batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else (batch["labels"] != -100).sum()


def train_step(engine, micro: list[dict], task: str, world: int,
               partials: Callable[[], torch.Tensor | None] | None = None) -> dict:
    """One optimizer step over this rank's micro-batches of one global batch; one host sync, at the end.

    `partials()`, called after the optimizer step, gives this rank's other values to sum over the ranks
    (1-D): they ride on the step's closing all-reduce, and their sums come back as `sums`."""
    labels = [scored_labels(b, task) for b in micro]
    # The loss is the mean over every target of the global batch, whatever the ranks and
    # micro-steps: normalise by the global count (DeepSpeed averages gradients over both).
    counts = ds.all_reduce_sum(torch.stack([
        sum((y != -100).sum() for y in labels), sum(_real_tokens(b) for b in micro)]).to(engine.device, torch.float64))
    targets = counts[0].clamp(min=1.0)
    scale = world * len(micro) / targets  # on the device: no sync
    lr = engine.get_lr()[0]  # the rate this step's update uses
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for b, y in zip(micro, labels):
        logits = engine(**model_inputs(b)).logits
        loss = summed_loss(logits, y, task)
        engine.backward(loss * scale.to(loss.dtype))
        engine.step()
        loss_sum += loss.detach().double()
    norm = engine.get_global_grad_norm()
    norm = norm.detach().double().reshape(()).to(engine.device) if torch.is_tensor(norm) else \
        torch.tensor(float(norm or 0.0), dtype=torch.float64, device=engine.device)
    extra = partials() if partials is not None else None
    local = loss_sum.reshape(1) if extra is None else torch.cat([loss_sum.reshape(1),
                                                                 extra.reshape(-1).to(engine.device, torch.float64)])
    summed = ds.all_reduce_sum(local)
    loss, grad_norm, tokens, *sums = torch.cat([torch.stack([summed[0] / targets, norm, counts[1]]),
                                                summed[1:]]).tolist()
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "sums": sums}


def step_with_callbacks(state: "RunState", micro: list[dict]) -> dict:
    """`train_step` with every callback's `step_partials` on its closing all-reduce, and the sums handed
    back through `on_step_sums`, in callback order; returns the step's values."""
    taken: list[tuple[Callback, int]] = []

    def partials():
        parts = []
        for c in state.callbacks:
            part = c.step_partials(state)
            if part is not None:
                parts.append(part.reshape(-1).to(torch.float64))
                taken.append((c, parts[-1].numel()))
        return torch.cat(parts) if parts else None

    values = train_step(state.engine, micro, state.cfg.task, state.world, partials)
    sums, offset = values.pop("sums"), 0
    for c, n in taken:
        c.on_step_sums(state, sums[offset:offset + n])
        offset += n
    return values


def _log_preempted(state: RunState) -> None:
    """How long after the signal the checkpoint was complete (rank 0, when this rank saw the signal)."""
    at = preemption.received_at()
    if state.rank == 0 and at is not None:
        seconds = time.time() - at
        state.metrics.event(state.step, "preempted", {"signal_to_checkpoint_s": seconds})
        log.warning("checkpoint step_%d complete %.2f s after the preemption signal", state.step, seconds)


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The callbacks a recipe implies: each feature that acts during training adds its own here."""
    callbacks: list[Callback] = [PreemptionCallback()]  # stop all ranks together on SIGUSR1/SIGTERM
    if cfg.adapter.method == "reslora":
        from .reslora_training import ResLoRACallback
        callbacks.append(ResLoRACallback())  # merge statistics, merge error at the end
    from .topology import topology_callbacks

    callbacks += topology_callbacks(cfg)  # MergeLoR2C / InjectLoR2C events
    return callbacks


def _batches(data: PreparedData, cfg: TrainConfig, rank: int, world: int):
    """(a loader for the training rows, steps per epoch). A stream is one endless epoch."""
    if data.streaming:
        shard = StreamShard(data.train, rank, world, cfg.seed, cfg.data.shuffle_buffer)
        return stream_loader(shard, data.collator, cfg.micro_batch_size), cfg.max_steps
    loader = train_loader(data.train, data.collator, cfg.micro_batch_size, cfg.global_batch_size, rank, world, cfg.seed)
    return loader, cfg.schedule_steps(len(data.train))[0]


def _log_start(cfg: TrainConfig, data: PreparedData, grad_accum: int, world: int, total_steps: int, engine) -> None:
    log.info("%s", trainable_summary(engine.module))
    log.info("global batch %d = micro batch %d x %d accumulation steps x %d ranks; %d steps",
             cfg.global_batch_size, cfg.micro_batch_size, grad_accum, world, total_steps)
    if not data.streaming:
        tail = len(data.train) % cfg.global_batch_size
        log.info("%d training rows: %d per epoch%s", len(data.train), math.ceil(len(data.train) / cfg.global_batch_size),
                 f"; the last global batch of each epoch holds {tail} rows plus {cfg.global_batch_size - tail} "
                 "filler rows that carry no loss" if tail else "")
    if data.label_names:
        log.info("label map: %s", dict(enumerate(data.label_names)))


def _start_or_resume(cfg: TrainConfig, rank: int) -> tuple[str | None, dict | None]:
    """(the checkpoint tag to resume from, its run_state) or (None, None) for a fresh run. With
    overwrite_output_dir a fresh run first moves the previous run's files aside (rank 0), unless this job
    is a requeue or restart of the job that wrote them. A checkpoint unfit for `cfg` raises ConfigError."""
    out = Path(cfg.output_dir)
    tag, restored = checkpoint.resume_point(cfg)
    if restored:
        checkpoint.check_resumable(cfg, tag, restored)
        if cfg.overwrite_output_dir and rank == 0:
            log.info("overwrite_output_dir: this job is a requeue of the one that wrote %s; resuming",
                     out / "checkpoints" / tag)
    elif cfg.overwrite_output_dir:
        if rank == 0:
            moved = checkpoint.move_aside(out)
            if moved:
                log.warning("overwrite_output_dir: the previous run's files in %s were moved to %s", out, moved)
        ds.barrier()
    return tag, restored


def _log_resume(state: "RunState", tag: str, how: dict, restore_s: float) -> None:
    """Rank 0: what a resume read, and a `resumed` event (its time to the first step is added later)."""
    if state.rank != 0:
        return
    log.info("resumed from %s at step %d (epoch %d): %s state written on %s rank(s) under ZeRO-%s, read on %d "
             "under ZeRO-%d in %.2f s", state.output_dir / "checkpoints" / tag, state.step, state.epoch, how["state"],
             how["saved_world"], how["saved_stage"], state.world, state.engine.zero_optimization_stage(), restore_s)
    if how["rng"] == "re-seeded":
        log.warning("resumed on %d rank(s) from a checkpoint of %s: each rank's RNG (dropout) is re-seeded from "
                    "(seed, step, rank); data order and schedule are unchanged", state.world, how["saved_world"])
def run(cfg: TrainConfig, rank: int, world: int, callbacks: list[Callback] | None = None) -> dict:
    """Train on this rank; returns the held-out metrics before and after (identical on all ranks)."""
    t_run = time.perf_counter()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    resume_tag, restored = _start_or_resume(cfg, rank)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    grad_accum = cfg.check_world(world)
    loader, steps_per_epoch = _batches(data, cfg, rank, world)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    callbacks = default_callbacks(cfg) if callbacks is None else list(callbacks)
    ckpt_root = out / "checkpoints"
    for c in callbacks:
        if restored:
            c.load_state_dict(restored["callbacks"].get(c.name, {}))

    ds_config = ds.build_ds_config(cfg, world, total_steps)
    model = load_model(cfg, ds_config)
    for c in callbacks:
        model = c.configure_model(model)
    engine = ds.initialize(model, ds_config)
    state = RunState(cfg, engine, rank, world, None, total_steps, steps_per_epoch, callbacks=callbacks,
                     label_names=data.label_names, data=data)
    state.run_id = (restored or {}).get("run_id") or ds.broadcast_object(checkpoint.new_run_id() if rank == 0 else None)
    if restored:
        t_restore = time.perf_counter()
        how = checkpoint.restore(engine, ckpt_root, resume_tag, rank, world, cfg.seed)
        state.step, state.epoch = restored["step"], restored["epoch"]
        state.best = restored.get("best")
        resumed = {"from": resume_tag, **how, "restore_s": time.perf_counter() - t_restore}
        _log_resume(state, resume_tag, how, resumed["restore_s"])
    if rank == 0:
        _log_start(cfg, data, grad_accum, world, total_steps, engine)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / "data_report.json").write_text(json.dumps({"splits": data.report}, indent=2) + "\n")
    state.metrics = MetricsLog(out, enabled=rank == 0)
    evals = eval_loader(data.eval, data.collator, cfg.micro_batch_size, rank, world)
    scored_sets = load_eval_sets(cfg.eval.multiple_choice_path, cfg.eval.generation_path, cfg.eval.max_examples)
    check_chat_rows(tokenizer, scored_sets["multiple_choice"] or [])  # now, not after training

    def held_out() -> dict:  # the held-out split, then the multiple-choice and generation sets
        values = evaluate(state.engine, evals, cfg.task)
        values.update(evaluate_sets(state.engine, tokenizer, scored_sets, batch_size=cfg.micro_batch_size,
                                    max_new_tokens=cfg.eval.max_new_tokens))
        return values

    results = {"trainable": trainable_summary(engine.module)}
    if cfg.eval_before and not restored:
        results["before"] = held_out()
        state.metrics.write(0, "eval", results["before"])
    for c in state.callbacks:
        c.on_train_start(state)

    state.engine.train()
    if restored:  # the time from the start of `run` to the first step of the resumed run
        state.metrics.event(state.step, "resumed", {**resumed, "to_first_step_s": time.perf_counter() - t_run})
    bar = tqdm(total=total_steps, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True)
    window_t, window_tokens = time.perf_counter(), 0.0
    while state.step < total_steps and not state.stop:
        done_in_epoch = state.step - state.epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        if data.streaming:
            loader.dataset.skip = state.step * grad_accum * cfg.micro_batch_size
        else:
            loader.sampler.set_epoch(state.epoch)
            loader.sampler.skip = done_in_epoch * grad_accum * cfg.micro_batch_size
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - done_in_epoch, total_steps - state.step)):
            micro = [{k: v.to(state.engine.device) for k, v in next(batches).items()} for _ in range(grad_accum)]
            values = step_with_callbacks(state, micro)
            state.step += 1
            if state.step == (state.epoch + 1) * steps_per_epoch:
                state.epoch += 1
            window_tokens += values.pop("tokens")
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                values.update(tokens_per_s=window_tokens / (time.perf_counter() - window_t), epoch=state.epoch)
                if data.streaming:
                    values["skipped_rows"] = ds.all_reduce_sum(torch.tensor(
                        float(loader.dataset.skipped), device=state.engine.device)).item()
                state.metrics.write(state.step, "train", values)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                window_t, window_tokens = time.perf_counter(), 0.0
            # the state tagged step k is the state after everything of step k: the step, then topology
            # events, statistics and the preemption vote, then evaluation and the best checkpoint, then saves
            for c in state.callbacks:
                c.on_step_end(state)
            if state.stop:
                break
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                state.record_eval(held_out())
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps \
                    and not state.saved_at_step():
                state.save_checkpoint()
    bar.close()

    if state.step < total_steps:  # stopped early (preemption): the checkpoint first, and nothing else
        if not state.saved_at_step():
            state.save_checkpoint(export=False)
        _log_preempted(state)
        state.metrics.close()
        return {"steps": state.step, "best": state.best, "stopped": True,
                "trainable": trainable_summary(state.engine.module)}
    results["after"] = held_out()
    for c in state.callbacks:
        c.on_train_end(state)
    state.record_eval(results["after"])
    if data.test is not None:
        test = eval_loader(data.test, data.collator, cfg.micro_batch_size, rank, world)
        results["test"] = evaluate(state.engine, test, cfg.task)
        state.metrics.write(state.step, "test", results["test"])
    if not state.saved_at_step():
        state.save_checkpoint()
    with ds.gathered_trainable(state.engine):
        if rank == 0:
            save_adapters(state.engine.module, out / "adapter")
            if data.label_names:
                (out / "adapter" / "label_map.json").write_text(json.dumps(data.label_names) + "\n")
    state.metrics.close()
    results["steps"] = state.step
    results["best"] = state.best
    results["trainable"] = trainable_summary(state.engine.module)  # after any topology change
    return results

