"""Stage 2b [our choice]: calibrate an emulator for its own plan, and measure how well it will transfer.

Stage 1 trains every harmonizer under random configurations; an emulator fixes one. An adapter tuned through
an emulator that is far from M learns to repair the emulator, and that part does not transfer. So after the
plan is fixed, the stand-ins (and optionally the kept frozen layers, as OT's distillation does) are fitted so
that the emulator *with M's own adapter layers* reproduces M: KL to M's logits plus the normalised MSE of the
residual stream after every position. The adapter layers are never touched (they are M's weights, which the
data owner starts from and the server plugs back). What it trains is updated in float32: the harmonizers are
float32 modules (make_emulator), anything else gets a float32 master copy (bf16 would round the updates away).

Forward matching fixes what the data owner's *top* adapters learn, not what the bottom ones learn. An adapter
layer's parameter gradient is a function of its input and of the loss's gradient w.r.t. its output. For the
top adapters everything after them is M's own layers, so once calibration matches their input (the hidden
NMSE) their gradients match too. The bottom adapters see M's exact input, but the gradient that reaches them
comes back through every stand-in, and matching the stand-ins' outputs does not match their backward (on
SmolLM2 at alpha = 0.5 the bottom adapters' gradient cosine with M stays at -0.26 / 0.01 after calibration,
while most of what transfers is learned there). `grad_weight` > 0 adds that missing term (GradOT / LLEOT):
the gradient of the LM loss w.r.t. the residual stream where the leading adapter run hands over (after
layer 1 for AA...), per token, should point where M's does. Since the layers below that point are M's own
weights on M's input in both networks, this gradient determines the bottom adapters' parameter gradients
exactly (chain rule through identical Jacobians), so matching it is the parameter-gradient match at the
cost of one backward instead of a per-layer flattening; it is denser (one target per token, not one cosine
per layer over the batch), so it should carry over better to the data owner's text than a batch-level
cosine on public text. Cosine, not MSE: AdamW, the data owner's optimizer, is invariant to the gradient's
overall scale. The cost is an extra backward through M and a double backward (create_graph) through the
emulator per step; the stand-ins are trained through the second-order graph.

`grad_match = "adapters"` is the direct form instead: 1 - the cosine between the adapter layers' parameter
gradients under the emulator and under M, per adapter layer (the fidelity figure itself, top adapters
included), at about the same cost. It asks for one direction per layer over the batch rather than one per
token: a much smaller target for the stand-ins to reach, but only the batch's aggregate.

Every one of those terms fits the emulator at one point: M's own adapter weights, where the data owner starts.
The data owner then moves away from it, and the further it goes the less the emulator's response to the move
is M's: after 64-128 steps most of what it learns repairs the emulator (docs/benchmarks.md: the plug-in stops
improving). `drift_lr` > 0 fits the stand-ins along such a trajectory instead: between calibration steps the
adapter layers take one AdamW step of plain LM fine-tuning through the emulator (what a data owner does, on
the calibration text), and the next calibration step matches the emulator to M *carrying those adapter
weights*; every `drift_reset` steps they go back to M's. The moves it simulates are the emulator's own descent
directions, i.e. the repair moves themselves, and the stand-ins learn to answer them as M does. M is never
written: it is matched through a view whose adapter layers share a private copy with the emulator's.
Measured on SmolLM2 (docs/benchmarks.md), it is worse: it flattens the plug-in's curve and raises the bottom
adapters' gradient cosine, but the fit at M's own weights suffers (ppl ratio 21.5 vs 14.3) and r at 32 data-owner
steps falls from 0.66 to 0.37 (lr 3e-4) and 0.32 (lr 1e-4). Off by default, and not a server setting.

`measure_fidelity` is the figure stored with every emulator: the perplexity ratio to M and the cosine between
the adapter's gradients under the emulator and under M (GradOT / LLEOT: what transfers is the gradient).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shared.architectures import decoder_layers
from shared.importance_config import CalibrationConfig  # re-exported: the knobs live there, torch-free
from shared.layer_plan import LayerPlan, Role
from shared.training import optimizer_step, random_batch, train_only_layers, warmup_cosine

from .losses import forward_with_hidden, hidden_nmse, lm_loss, logit_kl

GradStore = list[torch.Tensor]
GRAD_MATCHES = ("junction", "adapters")  # CalibrationConfig.grad_match


@dataclass
class CalibrationProgress:
    step: int
    total_steps: int
    kl: float
    nmse: float
    grad_mismatch: float | None = None  # the gradient term (grad_weight > 0 only): 1 - cosine with M's

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


def calibration_params(emu: nn.Module, plan: LayerPlan, cfg: CalibrationConfig) -> list[dict[str, Any]]:
    """Optimizer groups: harmonizer stand-ins at cfg.lr, kept layers at cfg.kept_lr (when > 0)."""
    layers = decoder_layers(emu)
    groups = [{"params": [p for i in plan.layers_with(Role.HARMONIZER) for p in layers[i].parameters()], "lr": cfg.lr}]
    if cfg.kept_lr > 0:
        groups.append(
            {"params": [p for i in plan.layers_with(Role.FROZEN) for p in layers[i].parameters()], "lr": cfg.kept_lr}
        )
    return [g for g in groups if g["params"]]


def float32_masters(
    groups: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[tuple[nn.Parameter, torch.Tensor]]]:
    """The optimizer groups over float32 master copies of the parameters that are not float32, and the
    (parameter, master) pairs. Kept layers of a bf16 M train through these: an update of kept_lr (~1e-5) is
    far below half a bf16 step of their weights and would round away. Float32 parameters (the harmonizers,
    every parameter of a float32 M) are trained as they are."""
    pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
    out = []
    for g in groups:
        params = []
        for p in g["params"]:
            if p.dtype == torch.float32:
                params.append(p)
            else:
                master = p.detach().float().requires_grad_(True)
                pairs.append((p, master))
                params.append(master)
        out.append({**g, "params": params})
    return out, pairs


def calibrate_emulator(
    model: nn.Module,
    emu: nn.Module,
    plan: LayerPlan,
    blocks: torch.Tensor,
    cfg: CalibrationConfig,
    progress: Callable[[CalibrationProgress], None] | None = None,
) -> dict[str, Any]:
    """Fit the emulator's non-adapter parts to M on task-agnostic token blocks (N, T). In place; M untouched."""
    groups = calibration_params(emu, plan, cfg)
    if cfg.steps <= 0 or not groups:
        return {"steps": 0, "seconds": 0.0, "config": cfg.to_dict()}
    t0 = time.perf_counter()
    device = next(emu.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    emu.requires_grad_(False).eval()
    model.eval()
    for p in (p for g in groups for p in g["params"]):
        p.requires_grad_(True)
    groups, masters = float32_masters(groups)
    trainable = [p for g in groups for p in g["params"]]  # what the optimizer updates, all float32
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)  # cosine to 0
    positions = list(range(plan.n_layers))
    if cfg.grad_match not in GRAD_MATCHES:
        raise ValueError(f"grad_match must be one of {GRAD_MATCHES}, got {cfg.grad_match!r}")
    junction = bottom_junction(plan)
    if cfg.grad_weight > 0 and cfg.grad_match == "junction" and junction is None:
        raise ValueError("grad_weight > 0 needs adapter layers at the bottom of the plan (layer 0 an adapter)")
    kl = nmse = torch.zeros(())
    mismatch: torch.Tensor | None = None
    drift: _Drift | None = None
    stack = ExitStack()
    try:
        if cfg.drift_lr > 0:  # from here on "model" is the view of M that carries the drifting adapters
            model, params = stack.enter_context(_drifting_adapters(model, emu, plan.adapter_layers))
            drift = _Drift(emu, plan.adapter_layers, params, cfg.drift_lr)
        for step in range(1, cfg.steps + 1):
            if drift is not None and step > 1:  # the data owner's next step, or back to M's weights
                if (step - 1) % cfg.drift_reset == 0:
                    drift.reset()
                else:
                    drift.step(random_batch(blocks, cfg.batch_size, gen, device))
            ids = random_batch(blocks, cfg.batch_size, gen, device)
            if cfg.grad_weight == 0:
                with torch.no_grad():
                    t_logits, t_hidden = forward_with_hidden(model, ids, positions)
                logits, hidden = forward_with_hidden(emu, ids, positions)
            elif cfg.grad_match == "junction":
                t_logits, t_hidden, t_grad = _forward_with_junction_grad(model, ids, positions, cast(int, junction))
                logits, hidden, grad = _forward_with_junction_grad(emu, ids, positions, cast(int, junction), True)
                mismatch = junction_grad_mismatch(grad, t_grad)
            else:
                layers = plan.adapter_layers
                t_logits, t_hidden, t_grads = _forward_with_adapter_grads(model, ids, positions, layers)
                logits, hidden, grads = _forward_with_adapter_grads(emu, ids, positions, layers, create_graph=True)
                mismatch = adapter_grad_mismatch(grads, t_grads)
            kl = logit_kl(logits, t_logits)
            # The residual stream after every position: where each stand-in rejoins M, it should carry M's state.
            nmse = torch.stack([hidden_nmse(hidden[i], t_hidden[i]) for i in positions]).mean()
            loss = cfg.kl_weight * kl + cfg.hidden_weight * nmse
            if mismatch is not None:
                loss = loss + cfg.grad_weight * mismatch
            if masters:
                _master_step(loss, opt, sched, trainable, masters)
            else:
                optimizer_step(loss, opt, clip=trainable, scheduler=sched)
            if progress is not None:
                g = None if mismatch is None else float(mismatch.detach())
                progress(CalibrationProgress(step, cfg.steps, float(kl.detach()), float(nmse.detach()), g))
    finally:
        stack.close()  # the emulator's adapter layers are M's tensors again
        train_only_layers(emu, plan.adapter_layers)  # as build_emulator left it
    out = {
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_kl": float(kl.detach()),
        "final_nmse": float(nmse.detach()),
        "config": cfg.to_dict(),
    }
    if mismatch is not None:
        out["final_grad_mismatch"] = float(mismatch.detach())
    return out


@contextmanager
def _drifting_adapters(
    model: nn.Module, emu: nn.Module, layers: list[int]
) -> Iterator[tuple[nn.Module, list[nn.Parameter]]]:
    """A view of M (new module objects over M's tensors) whose adapter layers hold, like the emulator's, one
    private copy of M's adapter weights: what moves the emulator's adapters moves the view's, and M is never
    written. On exit the emulator's adapter parameters are M's tensors again (shared or its own, as before)."""
    from .emulator import shared_memo  # here: emulator.py imports this module

    view = copy.deepcopy(model, shared_memo(model))
    for layer in decoder_layers(view):  # a copied instance forward (a checkpoint wrapper) would run M's own layer
        layer.__dict__.pop("forward", None)
    # New Parameter objects (own storage, own version counter: M's _version never sees the writes), each held by
    # the emulator's and the view's module in the same place; the emulator's old ones are put back on exit.
    swapped: list[tuple[dict[str, Any], str, nn.Parameter]] = []
    fresh: list[nn.Parameter] = []
    try:
        for i in layers:
            e_mods, v_mods = list(decoder_layers(emu)[i].modules()), list(decoder_layers(view)[i].modules())
            if len(e_mods) != len(v_mods):
                raise ValueError("the emulator's adapter layers are not M's layers")
            for em, vm in zip(e_mods, v_mods, strict=True):
                for name, p in list(em._parameters.items()):
                    if p is None:
                        continue
                    twin = vm._parameters.get(name)
                    if twin is None or twin.shape != p.shape:
                        raise ValueError("the emulator's adapter layers are not M's layers")
                    own = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    swapped.append((em._parameters, name, p))
                    em._parameters[name] = vm._parameters[name] = own
                    fresh.append(own)
        yield view, fresh
    finally:
        for params, name, p in swapped:
            params[name] = p


class _Drift:
    """The simulated data owner of `drift_lr` calibration: AdamW (the client's optimizer, gradient clipped at
    1.0 like its default) on the adapter layers through the emulator, float32 masters, from M's weights."""

    def __init__(self, emu: nn.Module, layers: list[int], params: list[nn.Parameter], lr: float) -> None:
        self.emu, self.layers, self.params, self.lr = emu, layers, params, lr
        self.start = [p.detach().float().clone() for p in params]
        self.reset()

    def reset(self) -> None:
        self.masters = [s.clone().requires_grad_(True) for s in self.start]
        self.opt = torch.optim.AdamW(self.masters, lr=self.lr, weight_decay=0.0)
        self._write()

    def step(self, ids: torch.Tensor) -> None:
        emu = self.emu
        _, _, per_layer = _layer_grads(
            emu, self.layers, lambda: (lm_loss(emu(input_ids=ids, use_cache=False).logits, ids), None)
        )
        flat = torch.cat(per_layer)
        k = 0
        for m in self.masters:
            m.grad = flat[k : k + m.numel()].view_as(m).clone()
            k += m.numel()
        torch.nn.utils.clip_grad_norm_(self.masters, 1.0)
        self.opt.step()
        self._write()

    def _write(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)


def bottom_junction(plan: LayerPlan) -> int | None:
    """The last layer of the plan's leading run of adapter layers (1 for `AA...`); None when layer 0 is not one.
    Up to its output M and the emulator compute the same thing, so the gradient there fixes the bottom adapters'."""
    junction = None
    for i, role in enumerate(plan.roles):
        if role != Role.ADAPTER:
            break
        junction = i
    return junction


@contextmanager
def _leaf_output(net: nn.Module, position: int) -> Iterator[GradStore]:
    """While open, decoder position `position` hands on a detached copy of its output that requires grad (a leaf
    to take the loss's gradient at); the leaf of each forward is appended to the yielded list."""
    store: GradStore = []

    def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        leaf = hidden.detach().requires_grad_(True)
        store.append(leaf)
        return (leaf, *out[1:]) if isinstance(out, tuple) else leaf

    handle = decoder_layers(net)[position].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _forward_with_junction_grad(
    net: nn.Module, ids: torch.Tensor, positions: list[int], junction: int, create_graph: bool = False
) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """forward_with_hidden plus the LM loss's gradient w.r.t. the residual stream after `junction` (N, T, H).
    For M (create_graph False) everything comes back detached; for the emulator the gradient keeps its graph,
    so a loss on it trains the stand-ins (a double backward). That needs SDPA's plain (math) attention: the fused
    CPU kernel's backward has no derivative of its own."""
    kernel = sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()
    with torch.enable_grad(), kernel, _leaf_output(net, junction) as store:
        logits, hidden = forward_with_hidden(net, ids, positions)
        (grad,) = torch.autograd.grad(lm_loss(logits, ids), store[0], create_graph=create_graph)
    if not create_graph:
        return logits.detach(), {i: h.detach() for i, h in hidden.items()}, grad
    return logits, hidden, grad


def _forward_with_adapter_grads(
    net: nn.Module, ids: torch.Tensor, positions: list[int], layers: list[int], create_graph: bool = False
) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[torch.Tensor]]:
    """forward_with_hidden plus the LM loss's gradient w.r.t. each adapter layer's parameters (flattened, one
    tensor per layer); detached for M, with its graph for the emulator (as _forward_with_junction_grad)."""

    def forward() -> tuple[torch.Tensor, tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        logits, hidden = forward_with_hidden(net, ids, positions)
        return lm_loss(logits, ids), (logits, hidden)

    kernel = sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()
    with kernel:
        _, (logits, hidden), per_layer = _layer_grads(net, layers, forward, create_graph=create_graph)
    if not create_graph:
        return logits.detach(), {i: h.detach() for i, h in hidden.items()}, per_layer
    return logits, hidden, per_layer


def _layer_grads(
    net: nn.Module,
    layers: list[int],
    forward: Callable[[], tuple[torch.Tensor, Any]],
    *,
    create_graph: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    """Run `forward` (-> (loss, anything)) with the decoder layers `layers` trainable and return the loss, the
    anything, and the loss's gradient w.r.t. each layer's parameters, flattened and concatenated per layer in
    `dtype`. The layers' requires_grad flags are restored before returning, so a later backward (calibration's)
    leaves them without .grad. Calibration's gradient term and the fidelity figure both measure this."""
    params = [list(decoder_layers(net)[i].parameters()) for i in layers]
    flat = [p for ps in params for p in ps]
    flags = [p.requires_grad for p in flat]
    # Under gradient checkpointing these layers would recompute in a later backward with their flags restored,
    # save other tensors than their forward did, and checkpoint refuses that: they keep their activations.
    checkpointed = {i: decoder_layers(net)[i].__dict__.pop("forward", None) for i in layers}
    try:
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss, aux = forward()
            grads = torch.autograd.grad(loss, flat, create_graph=create_graph)
    finally:
        for p, f in zip(flat, flags, strict=True):
            p.requires_grad_(f)
        for i, fwd in checkpointed.items():
            if fwd is not None:
                decoder_layers(net)[i].forward = fwd
    per_layer, k = [], 0
    for ps in params:
        per_layer.append(torch.cat([g.flatten().to(dtype) for g in grads[k : k + len(ps)]]))
        k += len(ps)
    return loss, aux, per_layer


def adapter_grad_mismatch(grads: list[torch.Tensor], t_grads: list[torch.Tensor]) -> torch.Tensor:
    """Mean over adapter layers of 1 - cosine(emulator's parameter gradient, M's)."""
    cos = torch.nn.functional.cosine_similarity
    return torch.stack([1 - cos(g, t, dim=0) for g, t in zip(grads, t_grads, strict=True)]).mean()


def junction_grad_mismatch(grad: torch.Tensor, t_grad: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cosine(emulator's gradient, M's). The last position is left out: the loss does not
    depend on its hidden state (nothing comes after it), so both gradients are zero there."""
    cos = torch.nn.functional.cosine_similarity(grad[:, :-1].float(), t_grad[:, :-1].float(), dim=-1)
    return 1 - cos.mean()


def _master_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.Tensor],
    masters: list[tuple[nn.Parameter, torch.Tensor]],
) -> None:
    """optimizer_step with float32 masters: the low-precision gradients move to the masters, the optimizer
    steps them, and the model's parameters take the masters' values rounded to their own dtype."""
    opt.zero_grad(set_to_none=True)
    for p, _ in masters:
        p.grad = None
    loss.backward()
    for p, m in masters:
        m.grad = None if p.grad is None else p.grad.float()
        p.grad = None
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        for p, m in masters:
            p.copy_(m)


def _adapter_grad(net: nn.Module, layers: list[int], ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss, _, grads = _layer_grads(
        net, layers, lambda: (lm_loss(net(input_ids=ids, use_cache=False).logits, ids), None), dtype=torch.float64
    )
    return float(loss.detach()), grads


def measure_fidelity(
    model: nn.Module, emu: nn.Module, plan: LayerPlan, blocks: torch.Tensor, n_blocks: int | None = None
) -> dict[str, Any]:
    """Perplexity ratio emulator / M and the adapter-gradient cosine (all adapter layers, and per layer) on the
    first `n_blocks` held-out blocks (None: all of them; the server passes SCALEOT_EMULATOR_FIDELITY_BLOCKS
    blocks); both with M's own adapter weights, i.e. what the data owner starts from."""
    ids = blocks[:n_blocks].to(next(emu.parameters()).device)
    layers = plan.adapter_layers
    was = model.training, emu.training
    model.eval()
    emu.eval()
    try:
        m_loss, m_grads = _adapter_grad(model, layers, ids)
        e_loss, e_grads = _adapter_grad(emu, layers, ids)
    finally:
        model.train(was[0])
        emu.train(was[1])
    cos = torch.nn.functional.cosine_similarity
    per_layer = [float(cos(a, b, dim=0)) for a, b in zip(m_grads, e_grads, strict=True)]
    total = float(cos(torch.cat(m_grads), torch.cat(e_grads), dim=0))
    return {
        "ppl_ratio": round(math.exp(e_loss - m_loss), 4),
        "grad_cosine": round(total, 4),
        "grad_cosine_per_layer": {str(i): round(c, 4) for i, c in zip(layers, per_layer, strict=True)},
        "val_loss_model": round(m_loss, 4),
        "val_loss_emulator": round(e_loss, 4),
        "n_blocks": len(ids),
    }
