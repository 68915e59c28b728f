"""Tiny random models of every supported transformers family, built from transformers' own config classes."""
from __future__ import annotations

import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, LABELS = 32, 3, 4, 2, 64, 100, 2

_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=0)

# model_type -> config kwargs on top of the common decoder/encoder ones
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {}, "qwen2": {}, "mistral": {"sliding_window": 4}, "granite": {}, "olmo2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
    "cohere": {},
    "starcoder2": {"sliding_window": 4},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8, "num_key_value_heads": HEADS},
    "gpt2": {"num_key_value_heads": None, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 64, "resid_pdrop": 0.0,
             "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gpt_neox": {"num_key_value_heads": None, "hidden_dropout": 0.0, "attention_dropout": 0.0, "rotary_pct": 0.5},
    "falcon": {"num_key_value_heads": None, "new_decoder_architecture": True, "num_kv_heads": KV_HEADS, "hidden_dropout": 0.0,
               "attention_dropout": 0.0, "parallel_attn": True},
    "bert": {}, "roberta": {"pad_token_id": 1}, "deberta-v2": {"position_biased_input": False,
                                                              "relative_attention": True,
                                                              "pos_att_type": ["c2p", "p2c"]},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 4, "embedding_dropout": 0.0,
                   "mlp_dropout": 0.0, "attention_dropout": 0.0,
                   "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2},
}
ENCODERS = ("bert", "roberta", "deberta-v2", "modernbert")
FAMILIES = tuple(FAMILY_CONFIGS)


def family_config(model_type: str, num_labels: int = LABELS):
    from transformers import CONFIG_MAPPING

    base = dict(_ENCODER if model_type in ENCODERS else _DECODER)
    base.update(FAMILY_CONFIGS[model_type])
    base = {k: v for k, v in base.items() if v is not None}
    config = CONFIG_MAPPING[model_type](**base, num_labels=num_labels, attn_implementation="eager")
    return config


def make_family(model_type: str, seed: int = 0, task: str | None = None):
    """A tiny random model in eval mode: causal LM for decoders, sequence classification for encoders."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = task or ("classification" if model_type in ENCODERS else "causal_lm")
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    torch.manual_seed(seed)
    return cls.from_config(family_config(model_type)).eval()


def family_input_ids(batch: int = 2, seq: int = 7, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
