"""The losses and the one measurement that stage 1, calibration, the recovery attacks and the fidelity figure
share: the next-token loss, and how far a mixed network (some layers replaced) is from the full model M.

`forward_with_hidden` records the residual stream after chosen decoder positions with forward hooks, so it also
sees the stand-ins (harmonizers) that transformers' own `output_hidden_states` would skip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.architectures import decoder_layers


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def hidden_nmse(hidden: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
    """Per-token normalised MSE of hidden states against the full model's.

    Normalised token by token: LLaMA-family residual streams carry "massive activations" (in SmolLM2 the
    first position's norm is ~100x the others' after layer 11), which would otherwise be the whole loss."""
    th = t_hidden.float()
    return ((hidden.float() - th).pow(2).sum(-1) / th.pow(2).sum(-1).clamp_min(1e-6)).mean()


def logit_kl(logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, on temperature-scaled logits."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(logits.float().flatten(0, 1) / t, -1),
            F.log_softmax(t_logits.float().flatten(0, 1) / t, -1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def fidelity_loss(
    logits: torch.Tensor, hidden: torch.Tensor, t_logits: torch.Tensor, t_hidden: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit KL, hidden-state NMSE): how far a mixed network is from M."""
    return logit_kl(logits, t_logits, temperature), hidden_nmse(hidden, t_hidden)


def forward_with_hidden(
    model: nn.Module, ids: torch.Tensor, positions: list[int] | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits, {i: output of decoder position i}) in one forward; default: the last position only.

    Hooks sit on whatever module fills each position (a harmonizer stand-in included); transformers'
    own output_hidden_states only records its decoder-layer class and would skip stand-ins."""
    layers = decoder_layers(model)
    positions = [len(layers) - 1] if positions is None else positions
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        layers[i].register_forward_hook(
            lambda mod, args, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i in positions
    ]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, outs
