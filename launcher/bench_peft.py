"""lor2c-bench's baseline `peft_lora`: PEFT LoRA under the HF Trainer with DeepSpeed, one process group.

    python -m torch.distributed.run --nproc_per_node N -m launcher.bench_peft SPEC.json

Started by launcher/bench.py with the spec of one configuration. Same model, synthetic batch, rank
(alpha = 2 r, no dropout), LoRA on the same q and v projections as lor2c_ds's `lora`, task head trained
(PEFT's modules_to_save), precision and DeepSpeed ZeRO settings (batch, optimizer and schedule given
to the Trainer as "auto"). The model is loaded the Trainer's way: after TrainingArguments(deepspeed=...)
exists, so that from_pretrained partitions it under zero.Init. A TrainerCallback times each optimizer
step from on_step_begin to on_step_end (forward, backward, clipping, optimizer and LR step) closed by a
barrier, and switches DeepSpeed's communication logger on for the last `comm_steps` steps; memory,
sizes and the checkpoint are measured as for the other methods (launcher.bench.report).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

# isort: off
from launcher import bench
from lor2c_ds import engine as ds  # first: it picks DeepSpeed's accelerator before transformers loads it
from transformers import TrainerCallback
# isort: on

# keys the Trainer fills from its own arguments (it refuses explicit values that differ)
_AUTO = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def trainer_ds_config(ds_config: dict) -> dict:
    """lor2c_ds's DeepSpeed config with what the Trainer sets itself left to "auto"."""
    config = json.loads(json.dumps(ds_config))
    config.update(dict.fromkeys(_AUTO, "auto"))
    config["bf16"] = {"enabled": "auto"}
    config["optimizer"]["params"].update(lr="auto", weight_decay="auto", betas="auto", eps="auto")
    config["scheduler"]["params"] = {"total_num_steps": "auto", "warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                     "warmup_num_steps": "auto", "warmup_type": "linear"}
    return config


def peft_targets(model) -> list[str]:
    """PEFT target names of the projections lor2c_ds's `lora` adapts (q, v)."""
    from lor2c_ds.registry import spec_for

    spec = spec_for(model)
    targets = []
    for name in bench.METHODS["lora"]["targets"]:
        proj = spec.projections[name]
        if proj.chunks > 1:
            raise ValueError(f"{bench.PEFT}: PEFT has no LoRA on one slice of the fused projection {proj.path}")
        targets.append(proj.path.rsplit(".", 1)[-1])
    return targets


class StepTimer(TrainerCallback):
    """Step times after warm-up, then the communication logger's window."""

    def __init__(self, spec: dict):
        self.spec, self.index, self.times, self.comm, self.t0 = spec, 0, [], {}, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.index == self.spec["warmup"] + self.spec["steps"]:
            ds.comms_logging(True)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        ds.barrier()
        if self.spec["warmup"] <= self.index < self.spec["warmup"] + self.spec["steps"]:
            self.times.append(time.perf_counter() - self.t0)
        self.index += 1
        if self.index == bench.total_steps(self.spec):
            self.comm = ds.logged_comms()
            ds.comms_logging(False)


def worker(spec: dict) -> None:
    warnings.filterwarnings("ignore")
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Trainer, TrainingArguments

    from lor2c_ds.train import load_backbone

    rank, world = ds.init_distributed()  # gloo on CPU; the Trainer (accelerate) reuses the process group
    cfg = bench.train_config(spec, world)
    ds_config = bench.ds_config_for(cfg, spec, world)
    with tempfile.TemporaryDirectory(prefix="lor2c_bench_peft_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, deepspeed=trainer_ds_config(ds_config), per_device_train_batch_size=spec["micro_batch"],
            gradient_accumulation_steps=1, max_steps=bench.total_steps(spec), learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=cfg.grad_clip, lr_scheduler_type="linear", warmup_steps=0,
            bf16=spec["precision"] == "bf16", use_cpu=not torch.cuda.is_available(), report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            remove_unused_columns=False, seed=0)
        # The Trainer's DeepSpeed config is live now: from_pretrained partitions under zero.Init.
        model = load_backbone(cfg, {})
        torch.manual_seed(0)
        r = spec["r"]
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS if spec["task"] == "classification" else TaskType.CAUSAL_LM,
            r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=peft_targets(model)))
        if spec["precision"] == "bf16":  # as lor2c_ds.engine.initialize: zero.Init built the backbone in
            for p in model.parameters():  # bf16, PEFT its adapters in fp32; DeepSpeed keeps fp32 masters
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        batch = bench.synthetic_batch(spec, model.config.vocab_size, rank)
        rows = [{k: v[i] for k, v in batch.items()} for i in range(spec["micro_batch"])]
        data = rows * (bench.total_steps(spec) * world)  # every rank's sampler gets enough rows
        timer = StepTimer(spec)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
        bench.report(spec, trainer.model_wrapped, rank, timer.times, timer.comm)
    ds.shutdown()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    worker(json.loads(Path(argv[0]).read_text()))
    bench.exit_now()


if __name__ == "__main__":
    main()
