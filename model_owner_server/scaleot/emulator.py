"""Stage 2: from (M, S, H) to an emulator at (N_a, alpha, beta).

- N_a adapter layers: original, trainable, at their original positions. Where they sit is `placement`
  [our choice, measured in docs/benchmarks.md]: "sandwich" (first and last N_a/2, as OT), "importance" (the
  N_a most important by S, the paper's rule) or "spread" (evenly spaced).
- the least important (by S) alpha share of the other layers -> their harmonizers.
- the rest -> frozen originals whose attention q/k/v/o (never the FFN) keep round((1 - beta) * rank)
  singular values (Selective Rank Compression), stored as two factors so the file shrinks.
Then, optionally, calibration for the fixed plan (calibrate.py) and the fidelity figure stored in the file.
Also the baselines: OT uniform LayerDrop (first/last 2 layers adapter, middle layers evenly dropped) and
CRaSh-style layer sharing (the same removed slots run the nearest kept layer again).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.architectures import decoder_layers
from shared.emulator_file import EmulatorFileInfo, count_params, save_emulator
from shared.emulator_model import apply_plan
from shared.layer_plan import LayerPlan, Role, importance_order
from shared.modules import Harmonizer
from shared.src import with_src_ranks
from shared.training import gradient_checkpointing as checkpointed_layers
from shared.training import train_only_layers

from .calibrate import CalibrationConfig, calibrate_emulator, calibration_params, measure_fidelity
from .corpus import corpus_blocks
from .importance import ImportanceResult

PLACEMENTS = ("sandwich", "importance", "spread")
DEFAULT_PLACEMENT = "sandwich"


def adapter_positions(
    scores: Sequence[float] | torch.Tensor, n_adapter: int, placement: str = DEFAULT_PLACEMENT
) -> list[int]:
    n = len(scores)
    if placement == "importance":
        return sorted(importance_order(scores)[:n_adapter])
    if placement == "sandwich":  # OT: the first ceil(N_a/2) and the last floor(N_a/2) layers
        head = (n_adapter + 1) // 2
        return sorted(set(range(head)) | set(range(n - (n_adapter - head), n)))
    if placement == "spread":  # evenly spaced, first and last included
        if n_adapter == 1:
            return [0]
        return sorted({round(j * (n - 1) / (n_adapter - 1)) for j in range(n_adapter)})
    raise ValueError(f"unknown adapter placement {placement!r}; use one of {', '.join(PLACEMENTS)}")


def scaleot_plan(
    scores: torch.Tensor,
    n_adapter: int,
    alpha: float,
    beta: float,
    model: nn.Module,
    bottleneck: int = 64,
    placement: str = DEFAULT_PLACEMENT,
    mix_heads: int = 0,
) -> LayerPlan:
    """`mix_heads` > 0 gives each stand-in a causal attention of that many heads of M's head width (CausalMix)."""
    n = len(scores)
    if not 1 <= n_adapter <= n:
        raise ValueError(f"n_adapter must be between 1 and the number of layers ({n}), got {n_adapter}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if mix_heads < 0:
        raise ValueError(f"mix_heads must be >= 0, got {mix_heads}")
    roles = scaleot_roles(scores, n_adapter, alpha, placement)
    replaced = Role.HARMONIZER in roles
    mix = mix_heads if replaced else 0
    plan = LayerPlan(
        roles,
        {},
        "scaleot",
        n_adapter,
        alpha,
        beta,
        bottleneck if replaced else 0,
        mix,
        model_head_dim(model) if mix else 0,
    )
    return with_src_ranks(plan, model)


def model_head_dim(model: nn.Module) -> int:
    """M's attention head width: what a stand-in's token mixer uses per head."""
    cfg: Any = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def scaleot_roles(
    scores: Sequence[float] | torch.Tensor, n_adapter: int, alpha: float, placement: str = DEFAULT_PLACEMENT
) -> list[Role]:
    """Each layer's role in the ScaleOT plan; needs only the stage-1 scores (the API's policy check uses it)."""
    n = len(scores)
    adapter = set(adapter_positions(scores, n_adapter, placement))
    rest = [i for i in importance_order(scores) if i not in adapter][::-1]  # least important first
    harmonized = set(rest[: round(alpha * len(rest))])
    return [Role.ADAPTER if i in adapter else Role.HARMONIZER if i in harmonized else Role.FROZEN for i in range(n)]


def uniform_layerdrop_plan(n_layers: int, n_dropped: int, n_edge: int = 2) -> LayerPlan:
    """OT baseline: adapter = first and last `n_edge` layers; `n_dropped` middle layers evenly dropped."""
    middle = list(range(n_edge, n_layers - n_edge))
    if n_layers <= 2 * n_edge or not 0 <= n_dropped <= len(middle):
        raise ValueError(f"cannot drop {n_dropped} of the {len(middle)} middle layers of a {n_layers}-layer model")
    # Evenly spaced: the centre of each of n_dropped equal slices of the middle.
    dropped = {middle[int((j + 0.5) * len(middle) / n_dropped)] for j in range(n_dropped)}
    roles = [
        Role.ADAPTER if i not in middle else Role.DROPPED if i in dropped else Role.FROZEN for i in range(n_layers)
    ]
    return LayerPlan(roles, {}, "uniform_layerdrop", 2 * n_edge, n_dropped / max(1, len(middle)), 0.0, 0)


def baseline_edge(n_layers: int, n_adapter: int, method: str) -> int:
    """n_edge of the OT/CRaSh baselines for `n_adapter` adapter layers: the first and last n_adapter / 2 layers.

    An odd count or one that leaves no middle layers is refused: these baselines place adapters symmetrically,
    so anything else would silently build a different number of adapter layers than asked for."""
    if n_adapter < 2 or n_adapter % 2:
        raise ValueError(
            f"the {method} baseline puts adapters on the first and last n_adapter/2 layers: "
            f"n_adapter must be an even number >= 2, got {n_adapter}"
        )
    if n_adapter >= n_layers:
        raise ValueError(
            f"n_adapter {n_adapter} leaves no middle layers in this {n_layers}-layer model: use at most {n_layers - 2}"
        )
    return n_adapter // 2


def layer_sharing_plan(n_layers: int, n_dropped: int, n_edge: int = 2) -> tuple[LayerPlan, dict[int, int]]:
    """CRaSh-style baseline: OT's dropped slots, each filled by the nearest kept layer run again.

    Returns the plan (every slot a frozen original) and {slot: kept layer whose weights it runs}. Training-free,
    no extra parameters; the file stores the shared weights once per slot (a baseline, not a product emulator)."""
    drop = uniform_layerdrop_plan(n_layers, n_dropped, n_edge)
    kept = drop.layers_with(Role.FROZEN)
    sources = {i: min(kept, key=lambda k: (abs(k - i), k)) for i in drop.layers_with(Role.DROPPED)}
    roles: list[Role] = [Role.FROZEN if r == Role.DROPPED else r for r in drop.roles]
    return LayerPlan(roles, {}, "layer_sharing", drop.n_adapter, drop.alpha, 0.0, 0), sources


def build_emulator(
    model: PreTrainedModel,
    plan: LayerPlan,
    harmonizers: dict[int, Harmonizer] | None = None,
    *,
    standin_dtype: torch.dtype | None = None,
    share_weights: bool = False,
) -> PreTrainedModel:
    """A new emulator module for `plan` (M itself is untouched); harmonizers in `standin_dtype` (None: M's).

    share_weights=False: the emulator owns every tensor (a deep copy of M, then the plan applied).
    share_weights=True (make_emulator): it holds only what differs from M. Every parameter and buffer the plan
    keeps as it is (embeddings, head, final norm, adapter layers, the frozen layers' FFN and norms, and their
    attention where SRC does not compress it) is a new Parameter (or tensor) over M's own storage, so it costs
    no memory; the stand-ins and SRC factors are new tensors. Reading, forwards, gradients (autograd.grad or
    .grad), requires_grad flags and `.to(dtype)` are safe on such an emulator; an in-place write into a shared
    tensor (an optimizer step, copy_, load_state_dict) would write into M: give what will be written its own
    storage first (`own_storage`)."""
    if plan.layers_with(Role.HARMONIZER) and harmonizers is None:
        raise ValueError("this plan has harmonizer positions: pass the harmonizers from stage 1")
    emu = copy.deepcopy(model, shared_memo(model) if share_weights else None)
    hs = {i: copy.deepcopy(h) for i, h in (harmonizers or {}).items()}
    with torch.no_grad():
        apply_plan(emu, plan, hs, compress=True, standin_dtype=standin_dtype)
    emu.config = copy.deepcopy(emu.config)
    train_only_layers(emu, plan.adapter_layers)
    return emu.eval()


def shared_memo(model: nn.Module) -> dict[int, Any]:
    """deepcopy's memo that maps each of M's parameters to a new Parameter over the same storage and each
    buffer to a detached alias: the copy gets its own module objects (setattr, requires_grad and `.to` on it
    never reach M) but no tensor data. The aliases share M's version counters, so an in-place write through
    them shows in M's `_version` (what `_check_untouched` reads)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():  # deduplicated: tied weights map to one Parameter, so they stay tied
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach()
    return memo


def _storages(model: nn.Module) -> set[int]:
    return {ptr for t in (*model.parameters(), *model.buffers()) if (ptr := t.untyped_storage().data_ptr())}


def own_storage(emu: nn.Module, model: nn.Module, params: Sequence[nn.Parameter]) -> int:
    """Give each of `params` (parameters of `emu`) that shares storage with `model` a new Parameter over its
    own copy, in every place `emu` holds it (tied weights stay tied); returns how many were copied. The new
    Parameters have their own version counters, so writing into them never reaches M."""
    shared = _storages(model)
    wanted = {id(p) for p in params if p.untyped_storage().data_ptr() in shared}
    fresh: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in emu.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in wanted:
                    if id(p) not in fresh:
                        fresh[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    module._parameters[name] = fresh[id(p)]
    return len(fresh)


def _copy_layer_into(dst: nn.Module, src: nn.Module) -> None:
    """`dst.load_state_dict(src.state_dict())` without writing into dst's tensors (they may be M's): dst's
    parameters and persistent buffers become new tensors holding copies of src's values."""
    values = src.state_dict()
    missing = set(dst.state_dict()) ^ set(values)
    if missing:
        raise ValueError(f"layers differ in their tensors: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, value in values.items():
            path, _, leaf = name.rpartition(".")
            module = dst.get_submodule(path) if path else dst
            old = getattr(module, leaf)
            copied = value.detach().clone().to(dtype=old.dtype, device=old.device)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(copied, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = copied


def _versions(model: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    out = []
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if not t.is_inference():  # inference tensors keep no version counter
            out.append((name, t, t._version))
    return out


def _check_untouched(before: list[tuple[str, torch.Tensor, int]]) -> None:
    """Raise if anything wrote into M's tensors in place since `before` (a shared tensor written by mistake)."""
    written = [name for name, t, v in before if t._version != v]
    if written:
        raise RuntimeError(
            f"the emulator build wrote into {len(written)} of the model's own tensors ({', '.join(written[:3])}"
            f"{', ...' if len(written) > 3 else ''}); M in this process no longer holds the registered weights. "
            "This is a bug: restart the worker to reload M, and report it"
        )


def build_blocks(
    tokenizer: PreTrainedTokenizerBase,
    corpus: str | Path | None,
    seq_len: int,
    max_blocks: int | None,
    need: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stage 1's task-agnostic (D^T, D^V) blocks again, for calibration and the fidelity figure.

    None when not needed or when the corpus is gone (an emulator is still built, uncalibrated)."""
    if not need or corpus is None or not Path(corpus).is_file():
        return None
    return corpus_blocks(tokenizer, corpus, seq_len, max_blocks=max_blocks)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def make_emulator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    importance: ImportanceResult | None,
    n_adapter: int,
    alpha: float,
    beta: float,
    output: str | Path,
    *,
    method: str = "scaleot",
    n_dropped: int | None = None,
    placement: str = DEFAULT_PLACEMENT,
    calibration: CalibrationConfig | None = None,
    calibration_blocks: torch.Tensor | None = None,
    fidelity_blocks: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, Any] | None = None,
    calibration_progress: Callable[[Any], None] | None = None,
    gradient_checkpointing: bool = False,
    mix_heads: int = 0,
) -> EmulatorFileInfo:
    """Plan, build, (calibrate,) measure and save an emulator; the info carries sizes next to the full model's.

    `calibration` needs `calibration_blocks` (task-agnostic token blocks, e.g. stage 1's D^T); the fidelity
    figure is measured on `fidelity_blocks` (e.g. stage 1's D^V) when given and stored in the file.
    `gradient_checkpointing` recomputes the emulator's layer activations in calibration's backward (less memory).
    `mix_heads` > 0 (ScaleOT only): the stand-ins get a cheap causal attention (shared/modules.py CausalMix)
    next to their MLP, trained by calibration from a zero output."""
    n_layers = len(decoder_layers(model))
    sources: dict[int, int] = {}
    harmonizers = None
    if method == "scaleot":
        if importance is None:
            raise ValueError("ScaleOT emulators need a stage-1 importance run")
        plan = scaleot_plan(
            importance.scores, n_adapter, alpha, beta, model, importance.config.bottleneck, placement, mix_heads
        )
        harmonizers = importance.harmonizers
    elif method in ("uniform_layerdrop", "layer_sharing"):
        n_edge = baseline_edge(n_layers, n_adapter, method)
        dropped = n_dropped if n_dropped is not None else (n_layers - 2 * n_edge) // 2  # half the middle
        if method == "uniform_layerdrop":
            plan = uniform_layerdrop_plan(n_layers, dropped, n_edge)
        else:
            plan, sources = layer_sharing_plan(n_layers, dropped, n_edge)
    else:
        raise ValueError(f"unknown emulator method {method!r}; use 'scaleot', 'uniform_layerdrop' or 'layer_sharing'")
    # The harmonizers stay float32 (as stage 1 trained them) until the file is written: calibration trains them,
    # and in bf16 their small updates round away. Whatever else calibration trains gets float32 master weights.
    compute = next(model.parameters()).dtype
    # Memory: M plus what differs. The emulator shares M's tensors wherever the plan keeps them as they are;
    # what calibration writes into (stand-ins, kept layers when kept_lr > 0) and the layer-sharing slots get
    # their own copies first, so nothing here writes into M (checked below through M's version counters).
    versions = _versions(model)
    emu = build_emulator(model, plan, harmonizers, standin_dtype=torch.float32, share_weights=True)
    if sources:
        layers = decoder_layers(emu)
        for slot, src in sources.items():
            _copy_layer_into(layers[slot], decoder_layers(model)[src])
    meta: dict[str, Any] = {"placement": placement if method == "scaleot" else "sandwich"}
    if calibration is not None and calibration.steps > 0:
        if calibration_blocks is None:
            raise ValueError("calibration needs calibration_blocks (task-agnostic token blocks)")
        own_storage(emu, model, [p for g in calibration_params(emu, plan, calibration) for p in g["params"]])
        with checkpointed_layers(emu, gradient_checkpointing):  # memory, not the result
            meta["calibration"] = calibrate_emulator(
                model, emu, plan, calibration_blocks, calibration, calibration_progress
            )
    if fidelity_blocks is not None:
        meta["fidelity"] = measure_fidelity(model, emu, plan, fidelity_blocks)
    _check_untouched(versions)
    # Calibration and the fidelity figure ran in M's compute dtype (float32 stand-ins inside); the file gets the
    # issued dtype, M's when none was asked (bf16 rounding of a float32 emulator moves its loss by < 0.01 nats on
    # SmolLM2: docs/benchmarks.md, half-size emulators).
    cast(nn.Module, emu).to(dtype or compute)
    sizes = {"full_model_params": count_params(model), "full_model_bytes": param_bytes(model)}
    info = save_emulator(emu, plan, tokenizer, output, {**sizes, **meta, **(extra_metadata or {})})
    info.extra.update(sizes)
    info.extra.update(meta)
    return info
