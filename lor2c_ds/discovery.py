"""Finding a transformers model's block stack, projections and task head from its structure.

Used by `registry.spec_for` for every model type without an explicit registry entry:

- block stack: the ModuleList whose blocks are all of one class named in `_no_split_modules` (else the
  longest ModuleList of one block class); two equally good stacks (encoder-decoder) are refused;
- projections: Linear / Conv1D modules inside a block, by the names transformers' families use, under
  the attention module (path component containing "attn" or "attention") or outside it (the MLP). A
  target exists only if its path is a projection in every block: MoE blocks keep their experts in fused
  3-d tensors and DeepSeek's first dense layers differ from the rest, so MoE models get attention targets;
- fused projections are split by the config's head counts (see `_fused_split`);
- task head: the top-level children with parameters other than the backbone and the output embeddings.
"""
from __future__ import annotations

from torch import nn

from .fused import OutputSlice

# target -> projection names under attention, most specific first (the last path components)
ATTENTION_NAMES = {
    "q": ("q_proj", "query", "query_proj", "q_b_proj"),  # q_b_proj: DeepSeek MLA's up-projection of q
    "k": ("k_proj", "key", "key_proj"),
    "v": ("v_proj", "value", "value_proj"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "Wo", "output.dense"),
}
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")
MLA_KV = "kv_b_proj"  # DeepSeek MLA: per head [k_nope, v]
# target -> names outside attention
MLP_NAMES = {
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "c_fc", "dense_h_to_4h", "fc1", "w3", "Wi", "intermediate.dense"),
    "down": ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "Wo", "output.dense"),
}
FUSED_GATE_UP = "gate_up_proj"  # Phi-3: [gate, up]
WHAT_IS_LOOKED_FOR = (
    "block stack: a ModuleList of the class named in _no_split_modules, else the longest ModuleList of one "
    "block class; projections: Linear/Conv1D named " + ", ".join(
        f"{t}={'/'.join(n)}" for t, n in {**ATTENTION_NAMES, **MLP_NAMES}.items())
    + f", fused {'/'.join(FUSED_QKV)} (q, k, v), {MLA_KV} (k, v), {FUSED_GATE_UP} (gate, up)")


class DiscoveryError(ValueError):
    pass


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (hasattr(module, "nx") and hasattr(module, "nf"))


def find_block_stack(model: nn.Module) -> str:
    """The dotted path of the model's block ModuleList."""
    named = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or "lora" in path:
            continue
        kinds = {type(b) for b in module}
        if len(kinds) == 1 and any(True for _ in module[0].parameters()):
            found.append((type(module[0]).__name__ in named, len(module), path))
    if not found:
        raise DiscoveryError("no block stack (no ModuleList of identical blocks)")
    best = max(found, key=lambda f: f[:2])
    rivals = [f[2] for f in found if f[:2] == best[:2]]
    if len(rivals) > 1 or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise DiscoveryError(f"more than one block stack ({', '.join(rivals)}): encoder-decoder models "
                             "are not adapted")
    return best[2]


def _projections_of(block: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in block.named_modules()
            if path and is_projection(m) and "lora" not in path}


def _under_attention(path: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in path.split(".")[:-1])


def _named(paths, names) -> str | None:
    for name in names:
        for path in paths:
            if path == name or path.endswith("." + name):
                return path
    return None


def _heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the config."""
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if hasattr(config, "new_decoder_architecture"):  # Falcon
        kv = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, int(kv), int(head_dim)


def _fused_split(name: str, config, d_out: int) -> tuple[int, tuple[int, ...]]:
    """(groups, part widths) of a fused q/k/v projection of `d_out` rows, from the config's head counts."""
    heads, kv, hd = _heads(config)
    if name == "query_key_value" and hasattr(config, "new_decoder_architecture"):  # Falcon
        if config.new_decoder_architecture:  # per kv group: its query heads, one k, one v
            split = (kv, ((heads // kv) * hd, hd, hd))
        elif config.multi_query:
            split = (1, (heads * hd, hd, hd))
        else:
            split = (heads, (hd, hd, hd))
    elif name == "query_key_value":  # GPT-NeoX: per head [q, k, v]
        split = (heads, (hd, hd, hd))
    else:  # contiguous [q | k | v], k and v of the kv heads (Phi-3, GPT-2, ModernBERT)
        split = (1, (heads * hd, kv * hd, kv * hd))
    if split[0] * sum(split[1]) != d_out:
        raise DiscoveryError(f"cannot derive the q/k/v split of fused projection {name!r}: {d_out} output rows, "
                             f"the config's heads ({heads} q, {kv} kv, head dim {hd}) give "
                             f"{split[0]} x {split[1]}")
    return split


def _part(path: str, chunk: int, groups: int, widths: tuple[int, ...]):
    from .arch import Projection

    offset = sum(widths[:chunk])
    return Projection(path, chunk, len(widths), OutputSlice(offset, widths[chunk], sum(widths), groups))


def discover_projections(blocks: nn.ModuleList, config) -> dict:
    """short target name -> Projection, for the targets present in every block."""
    from .arch import Projection, projection_dims

    first = _projections_of(blocks[0])
    common = {p for p in first if all(is_projection(m) for m in [_get(b, p) for b in blocks[1:]])}
    attention = sorted(p for p in common if _under_attention(p))
    mlp = sorted(p for p in common if not _under_attention(p))
    found: dict[str, Projection] = {}
    for target, names in ATTENTION_NAMES.items():
        path = _named(attention, names)
        if path is not None:
            found[target] = Projection(path)
    fused = _named(attention, FUSED_QKV)
    if fused is not None and not {"q", "k", "v"} & set(found):
        groups, widths = _fused_split(fused.rpartition(".")[2], config, projection_dims(first[fused])[1])
        found.update({t: _part(fused, i, groups, widths) for i, t in enumerate("qkv")})
    mla = _named(attention, (MLA_KV,))
    if mla is not None and not {"k", "v"} & set(found):
        heads, nope, v_dim = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
        if heads * (nope + v_dim) != projection_dims(first[mla])[1]:
            raise DiscoveryError(f"cannot derive the k/v split of {mla}: {projection_dims(first[mla])[1]} rows, "
                                 f"the config gives {heads} heads x ({nope} + {v_dim})")
        found.update({t: _part(mla, i, heads, (nope, v_dim)) for i, t in enumerate("kv")})
    if "o" in found and found["o"].path in {p.path for t, p in found.items() if t != "o"}:
        del found["o"]
    for target, names in MLP_NAMES.items():
        path = _named(mlp, names)
        if path is not None:
            found[target] = Projection(path)
    gate_up = _named(mlp, (FUSED_GATE_UP,))
    if gate_up is not None and not {"gate", "up"} & set(found):
        d_out = projection_dims(first[gate_up])[1]
        found.update({t: _part(gate_up, i, 1, (d_out // 2, d_out // 2)) for i, t in enumerate(("gate", "up"))})
    if "down" in found and found["down"].path == found.get("up", found.get("gate", Projection(""))).path:
        del found["down"]
    return found


def _get(block: nn.Module, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def discover_heads(model: nn.Module) -> tuple[str, ...]:
    backbone = getattr(model, "base_model_prefix", "")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return tuple(name for name, child in model.named_children()
                 if name != backbone and child is not output and name != "lor2c"
                 and any(True for _ in child.parameters()))


def discover(model: nn.Module):
    """An ArchSpec read off `model`; DiscoveryError says what is missing."""
    from .arch import ArchSpec

    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise DiscoveryError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    config = model.config
    if getattr(config, "hidden_size", None) is None:
        raise DiscoveryError("its config has no hidden_size")
    path = find_block_stack(model)
    blocks = model.get_submodule(path)
    projections = discover_projections(blocks, config)
    return ArchSpec(block_paths=(path,), projections=projections, heads=discover_heads(model),
                    default_targets=("q", "v"), extra={"discovered": True})
