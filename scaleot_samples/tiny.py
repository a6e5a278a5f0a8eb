"""Tiny random-init models and a byte-level tokenizer, for tests, CI and the quick demo.

Real weights are not available offline; these configs exercise each supported family's code path
(fused q/k/v, GQA, sliding-window layers, q/k norms, parallel residual) in milliseconds.
Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

EOS = "<|endoftext|>"
FAMILIES = ("gpt2", "opt", "llama", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox")


# ChatML written in bytes (the tiny vocabulary has one special token): a BOS first, as LLaMA-3 and Gemma templates
# write one, and EOS closing each turn, as SmolLM2's <|im_end|> does.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer (256 bytes + EOS): no training, fully deterministic.

    ``chat_template``: with :data:`TINY_CHAT_TEMPLATE`, so chat (``messages``) data can be rendered."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    if chat_template:
        tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_config(family: str, n_layers: int = 4, hidden: int = 32, vocab: int = 257) -> PretrainedConfig:
    eos = vocab - 1
    if family == "gpt2":
        return GPT2Config(
            n_layer=n_layers,
            n_embd=hidden,
            n_head=4,
            vocab_size=vocab,
            n_positions=256,
            bos_token_id=eos,
            eos_token_id=eos,
        )
    if family == "opt":
        return OPTConfig(
            num_hidden_layers=n_layers,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_attention_heads=4,
            vocab_size=vocab,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    # Shared by the families below: GQA (2 key/value heads for 4 query heads) and every special token = EOS.
    common = dict(
        num_hidden_layers=n_layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":  # a llama-family variant (q/k/v biases), for the GGUF import tests
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "gemma":  # Gemma 1: LLaMA-like layers, embeddings scaled by sqrt(hidden), separate head_dim
        return GemmaConfig(**common, head_dim=hidden // 4)
    if family in ("gemma2", "gemma3_text"):
        # Alternating sliding/full layers with a window shorter than the test sequences, so both masks matter.
        layer_types = ["sliding_attention", "full_attention"] * (n_layers // 2) + ["sliding_attention"] * (n_layers % 2)
        cls = Gemma2Config if family == "gemma2" else Gemma3TextConfig
        return cls(
            **common, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=8, layer_types=layer_types
        )
    if family == "phi3":  # fused qkv_proj with fewer k/v heads, fused gate_up_proj
        return Phi3Config(**common, original_max_position_embeddings=256)
    if family == "gpt_neox":  # fused per-head query_key_value, parallel residual, untied output embedding
        return GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            vocab_size=vocab,
            max_position_embeddings=256,
            bos_token_id=eos,
            eos_token_id=eos,
            use_parallel_residual=True,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES} or qwen2")


def tiny_model(family: str = "llama", n_layers: int = 4, hidden: int = 32, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers, hidden))
    return model.eval()


def save_tiny_model_dir(
    path: str | Path,
    family: str = "llama",
    n_layers: int = 4,
    hidden: int = 32,
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    chat_template: bool = False,
) -> Path:
    """Write a tiny model + tokenizer as a normal local Hugging Face folder (safetensors).

    dtype: store the weights in that dtype (a bf16/fp16 checkpoint); max_shard_size (e.g. "20KB"): write
    sharded safetensors with model.safetensors.index.json, as large checkpoints come; chat_template: the
    tokenizer carries :data:`TINY_CHAT_TEMPLATE`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model(family, n_layers, hidden, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer:
        byte_tokenizer(chat_template).save_pretrained(path)
    return path
