"""Stage-1 data: a task-agnostic text file cut into token blocks (also the calibration, fidelity and privacy-audit
data path)."""

from __future__ import annotations

from pathlib import Path

import torch


def corpus_blocks(
    tokenizer,
    corpus: str | Path,
    seq_len: int = 256,
    val_fraction: float = 0.1,
    val_corpus: str | Path | None = None,
    max_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 data: a task-agnostic text file cut into D^T / D^V token blocks (N, seq_len).

    Without a separate validation file, the last `val_fraction` of the blocks is D^V (contiguous, so no text
    is shared between the two)."""
    from shared.data import load_dataset, pack_text_blocks  # text files only; DataError names the file

    def blocks(path) -> torch.Tensor:
        ds = load_dataset(path)
        if ds.kind != "text":
            raise ValueError(f'{path}: the stage-1 corpus must be plain text (.txt or JSONL {{"text"}}), got {ds.kind}')
        return pack_text_blocks(tokenizer, ds.records, seq_len)

    train = blocks(corpus)
    if val_corpus is not None:
        val = blocks(val_corpus)
    else:
        if len(train) < 2:
            raise ValueError(
                f"{corpus}: too little text for a train/validation split at seq_len {seq_len}; "
                "give a longer corpus, a smaller --seq-len or a --val-corpus"
            )
        n_val = max(1, int(len(train) * val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    if max_blocks:
        train = train[:max_blocks]
    return train, val
