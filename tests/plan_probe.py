"""One step of a real DeepSpeed engine, measured for `lor2c-plan --validate`, with what launcher/bench.py
does not record: the bytes autograd saves for backward.

    python -m torch.distributed.run --nproc_per_node 2 tests/plan_probe.py MODEL_DIR METHOD OUT.json \
        [--zero 3] [--seq 32] [--micro-batch 2] [--precision fp32] [--task causal_lm] [--r 8]
        [--zero-knob stage3_max_reuse_distance=0 ...]

The engine, the method and the batch are launcher/bench.py's; the sizes and the communication come from
lor2c_ds.engine's measurement helpers, so rank 0 writes a record with bench.json's fields (one value
per rank), plus `activation_bytes`: the storages saved for backward in one forward (autograd's
saved-tensor hooks; parameters excluded, a storage saved twice counted once), the largest over ranks.
A first step runs before the measured one (it records DeepSpeed's module trace and fetches differently).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


class SavedBytes:
    """Bytes autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, params):
        self.params = {p.data.untyped_storage().data_ptr() for p in params if p.numel()}
        self.sizes: dict[int, int] = {}

    def pack(self, t):
        import torch

        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in self.params:
                self.sizes[storage.data_ptr()] = storage.nbytes()
        return t


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("method")
    p.add_argument("out")
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--task", default="causal_lm")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--zero-knob", action="append", default=[], metavar="KEY=VALUE",
                   help="override a zero_optimization setting (stage3_max_reuse_distance, "
                        "stage3_prefetch_bucket_size, stage3_max_live_parameters: they decide what is gathered again)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    from launcher import bench
    from lor2c_ds import engine as ds
    from lor2c_ds.train import load_backbone, scored_labels, summed_loss

    spec = {"model": args.model, "task": args.task, "method": args.method, "r": args.r, "zero": args.zero,
            "precision": args.precision, "seq": args.seq, "micro_batch": args.micro_batch,
            "warmup": 1, "steps": 0, "comm_steps": 1}
    rank, world = ds.init_distributed()
    cfg = bench.train_config(spec, world)
    ds_config = bench.ds_config_for(cfg, spec, world)
    knobs = {key: float(value) for key, _, value in (k.partition("=") for k in args.zero_knob)}
    ds_config["zero_optimization"].update(knobs)
    model = bench.apply_method(load_backbone(cfg, ds_config), args.method, args.r)
    engine = ds.initialize(model, ds_config)
    engine.train()  # as the training loop does: dropout on (from_pretrained returns an eval-mode model)
    batch = {k: v.to(engine.device) for k, v in bench.synthetic_batch(spec, model.config.vocab_size, rank).items()}
    labels = scored_labels({**batch, "valid": torch.ones(args.micro_batch, device=engine.device)}, args.task)

    saved = SavedBytes(engine.module.parameters())
    for step in range(2):
        if step == 1:
            ds.comms_logging(True)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if step == 1 else contextlib.nullcontext():
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = summed_loss(logits, labels, args.task) / labels.numel()
        engine.backward(loss)
        engine.step()
        del logits, loss
        ds.barrier()
    comm = ds.logged_comms()
    ds.comms_logging(False)
    mine = {**ds.parameter_bytes(engine), "optimizer_state": ds.optimizer_state_bytes(engine),
            "activations": sum(saved.sizes.values()), **bench.peak_memory()}
    everyone = ds.all_gather_object(mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "model": args.model, "task": args.task, "method": args.method, "r": args.r, "ranks": world,
            "zero_stage": engine.zero_optimization_stage(), "precision": args.precision, "seq": args.seq,
            "micro_batch": args.micro_batch, "comm_bytes_per_step": comm["bytes"],
            "comm_message_bytes_per_step": comm["message_bytes"],
            "backbone_bytes_per_rank": [m["backbone"] for m in everyone],
            "trainable_bytes_per_rank": [m["trainable"] for m in everyone],
            "optimizer_state_bytes_per_rank": [m["optimizer_state"] for m in everyone],
            "peak_rss_bytes": [m["peak_rss_bytes"] for m in everyone],
            "cuda_max_allocated_bytes": [m["cuda_max_allocated_bytes"] for m in everyone],
            "activation_bytes": max(m["activations"] for m in everyone), "zero_knobs": knobs,
        }, indent=2) + "\n")
    ds.shutdown()


if __name__ == "__main__":
    main()
