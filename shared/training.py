"""The pieces every training loop of the project shares: stage 1 (scaleot/importance.py), calibration
(scaleot/calibrate.py), the recovery attacks (scaleot/attack.py) and the data owner's fine-tuning
(data_owner_client/train.py). The loops themselves differ (what trains, on what loss, with which schedule), so
each keeps its own; what they have in common is here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shared.architectures import decoder_layers, layer_prefix


def random_batch(blocks: torch.Tensor, size: int, gen: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """`size` token blocks (rows of `blocks`, (N, T)) drawn uniformly with replacement from the seeded `gen`;
    never more rows than there are blocks."""
    idx = torch.randint(len(blocks), (min(size, len(blocks)),), generator=gen)
    return blocks[idx].to(device)


def train_only_layers(model: nn.Module, layers: Iterable[int]) -> list[str]:
    """Freeze `model` except the decoder layers `layers` (the adapter layers); returns the trainable
    parameters' full names. What the data owner trains, and what an emulator issues as trainable."""
    model.requires_grad_(False)
    blocks = decoder_layers(model)
    names: list[str] = []
    for i in layers:
        blocks[i].requires_grad_(True)
        names += [layer_prefix(model, i) + n for n, _ in blocks[i].named_parameters()]
    return names


def warmup_cosine(
    optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int = 0, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor: linear warm-up over `warmup_steps` ((s + 1) / warmup), then a cosine from 1 down
    to `floor` at step `steps`. Calibration uses (warmup 0, floor 0), the recovery attacks (4, 0.1)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    clip: Iterable[torch.Tensor] | None = None,
    max_grad_norm: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """One update: zero the gradients, backpropagate `loss`, clip the norm of `clip`'s gradients (when
    given), step the optimizer, then the schedule (when given)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While open, every decoder position of `model` (M's layers, an emulator's stand-ins alike) keeps only its
    input for the backward pass and recomputes its activations there: peak memory drops by the per-layer
    activations, for about one more forward of compute. Applied to the layer modules directly rather than
    through transformers' switch, which acts only in train mode and only on its own layer classes, while stage 1
    and calibration train stand-ins inside an eval-mode M. Forwards without grad run as before; the modules are
    as they were after the block (the instance attribute it adds is removed)."""
    if not enabled:
        yield
        return
    layers = list(decoder_layers(model))
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)  # instance attribute: shadows the class's forward
    if config is not None and use_cache is not None:
        config.use_cache = False  # a KV cache filled twice (forward and recompute) would be wrong
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recompute runs in the backward pass, outside the caller's context: give it the attention kernels
        # the forward had (calibration's gradient term forces the math kernel, the only one with a double
        # backward; another kernel in the recompute saves other tensors and checkpoint refuses the mismatch).
        backends = _active_sdpa_backends()
        return torch.utils.checkpoint.checkpoint(
            forward,
            *args,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), _Kernels(backends)),
            **kwargs,
        )

    return run


class _Kernels:
    """sdpa_kernel(backends) as a reusable context: checkpoint re-enters one object per recompute (one per
    backward pass; calibration's gradient term runs two), and sdpa_kernel's own context is single-use."""

    def __init__(self, backends: list[SDPBackend]) -> None:
        self.backends = backends
        self.open: list[Any] = []

    def __enter__(self) -> None:
        ctx = sdpa_kernel(self.backends)
        ctx.__enter__()
        self.open.append(ctx)

    def __exit__(self, *exc: Any) -> None:
        self.open.pop().__exit__(*exc)


def _active_sdpa_backends() -> list[SDPBackend]:
    """The scaled-dot-product-attention kernels allowed now (sdpa_kernel sets these global switches)."""
    flags = torch.backends.cuda
    allowed = {
        SDPBackend.MATH: flags.math_sdp_enabled(),
        SDPBackend.FLASH_ATTENTION: flags.flash_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: flags.mem_efficient_sdp_enabled(),
        SDPBackend.CUDNN_ATTENTION: flags.cudnn_sdp_enabled(),
    }
    return [backend for backend, on in allowed.items() if on]
