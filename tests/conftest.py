"""Shared pytest fixtures for lor2c_ds."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# DeepSpeed compiles its ops (cpu_adam, ...) into TORCH_EXTENSIONS_DIR; give every test session its own
# directory unless the caller chose one, so concurrent sessions never share a half-built extension.
# This must run before anything imports deepspeed, hence at conftest import time.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    _ext_dir = tempfile.mkdtemp(prefix="lor2c_ds_torch_ext_")
    os.environ["TORCH_EXTENSIONS_DIR"] = _ext_dir
    atexit.register(shutil.rmtree, _ext_dir, ignore_errors=True)
# prepared datasets (lor2c_ds.data.cache): one folder per test session, shared by its spawned ranks
if "LOR2C_DS_DATA_CACHE" not in os.environ:
    _data_cache = tempfile.mkdtemp(prefix="lor2c_ds_prepared_")
    os.environ["LOR2C_DS_DATA_CACHE"] = _data_cache
    atexit.register(shutil.rmtree, _data_cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402


# =====================================================================================================
# Tiny random models (single process, CPU, no downloads)
#
# Every builder seeds torch itself, so two calls give bit-identical models: a test can build "the same
# model" twice (one to adapt, one as the untouched reference) without deep-copying an adapted model.
# All models use SDPA attention (with attention_mask=None, SDPA is causal for decoders) and have every
# dropout at 0, so train mode is deterministic too. They are returned in eval mode.
# =====================================================================================================

TINY_HIDDEN = 32
TINY_LAYERS = 3
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 64
TINY_VOCAB = 100
TINY_LABELS = 2
ATTN_IMPLEMENTATION = "sdpa"
FAMILIES = ("bert", "llama", "gpt2")


def make_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, intermediate_size=TINY_INTERMEDIATE, num_labels=TINY_LABELS,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, attn_implementation=ATTN_IMPLEMENTATION,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_KV_HEADS,
        intermediate_size=TINY_INTERMEDIATE, max_position_embeddings=64, attention_dropout=0.0,
        tie_word_embeddings=False, attn_implementation=ATTN_IMPLEMENTATION,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=TINY_HEADS,
        n_positions=64, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation=ATTN_IMPLEMENTATION,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"bert": make_bert, "llama": make_llama, "gpt2": make_gpt2}


def make_model(family: str, seed: int = 0):
    return BUILDERS[family](seed)


def make_input_ids(batch: int = 2, seq: int = 7, seed: int = 1234) -> torch.Tensor:
    """Token ids in [1, vocab) (0 is GPT-2's bos/eos), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, TINY_VOCAB, (batch, seq), generator=g)


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model("bert" | "llama" | "gpt2", seed=0)` -> a fresh tiny model in eval mode."""
    return make_model


@pytest.fixture
def bert_model():
    return make_bert()


@pytest.fixture
def llama_model():
    return make_llama()


@pytest.fixture
def gpt2_model():
    return make_gpt2()


@pytest.fixture
def input_ids():
    return make_input_ids()

# =====================================================================================================
# End of the tiny-model section. Distributed (DeepSpeed, multi-process) fixtures go below this line.
# =====================================================================================================
