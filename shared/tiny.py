"""Tiny random-init models and a byte-level tokenizer, for tests, CI and the quick demo.

Real GPT-2 / OPT weights are not available offline; these configs exercise each supported
family's code path in milliseconds. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
FAMILIES = ("gpt2", "opt", "llama")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer (256 bytes + EOS): no training, fully deterministic."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def tiny_config(family: str, n_layers: int = 4, hidden: int = 32, vocab: int = 257) -> PretrainedConfig:
    eos = vocab - 1
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=256,
                          bos_token_id=eos, eos_token_id=eos)
    if family == "opt":
        return OPTConfig(num_hidden_layers=n_layers, hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=4,
                         vocab_size=vocab, max_position_embeddings=256, word_embed_proj_dim=hidden,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=n_layers, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                           max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                           tie_word_embeddings=True)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def tiny_model(family: str = "llama", n_layers: int = 4, hidden: int = 32, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers, hidden))
    return model.eval()


def save_tiny_model_dir(path: str | Path, family: str = "llama", n_layers: int = 4, hidden: int = 32,
                        seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a normal local Hugging Face folder (safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(family, n_layers, hidden, seed).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
