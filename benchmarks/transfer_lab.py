"""Exploration behind docs/benchmarks.md "What we tried": one seed, Task A, alpha = 0.5 depth (13 of the 26
middle layers replaced), OT sandwich adapters. Not the product path (benchmarks/transfer.py is); kept so the
exploratory numbers can be reproduced:  .venv/bin/python benchmarks/transfer_lab.py drop harm100 kept100
(REPSET=loo picks the 13 least important layers by leave-one-out: run the loo step first).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import copy
import json
import math
import sys
import time

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch
import torch.nn.functional as F

from data_owner_client.train import TrainConfig, freeze_except_adapter, resolve_device, set_seed, train
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.importance import swapped_layers
from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2
from scaleot_samples import corpora
from shared.architectures import decoder_layers
from shared.data import load_dataset, pad_id_for, training_examples
from shared.evaluation import evaluate
from shared.modules import DroppedLayer, Harmonizer, HarmonizerLayer

torch.set_num_threads(2)
W = REPO / ".cache" / "lab"
W.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()


def log(m):
    print(f"[{time.perf_counter() - T0:7.1f}s] {m}", flush=True)


model_dir = prepare_smollm2(W / "smollm2")
M, tok = load_causal_lm(model_dir)
D = W / "data"
if not (D / "wiki_train.txt").exists():
    corpora.write_wiki_files(D, 400_000, 50_000)
    corpora.write_shakespeare_files(D, 4, 1, seed=0)
wtrain, wval = corpus_blocks(tok, D / "wiki_train.txt", 128, val_corpus=D / "wiki_val.txt")
task_train, task_eval = load_dataset(D / "shakespeare_train.txt"), load_dataset(D / "shakespeare_eval.txt")
choice = resolve_device("cpu")
L = len(decoder_layers(M))
EVAL_N = 24
FT_STEPS = int(os.environ.get("FT_STEPS", 32))


def ev(model):
    return evaluate(model, tok, task_eval, seq_len=128, batch_size=8, max_examples=EVAL_N)["loss"]


def tune(model, layers, steps=FT_STEPS, seed=0):
    cfg = TrainConfig(max_steps=steps, batch_size=4, seq_len=128, seed=seed)
    set_seed(seed)
    ex = training_examples(task_train, tok, 128)
    freeze_except_adapter(model, layers)
    train(model, ex, cfg, choice, pad_id=pad_id_for(tok), progress=False)
    model.requires_grad_(False)
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(n.startswith(f"model.layers.{i}.") for i in layers)
    }


def plug(adapter, base=M):
    P = copy.deepcopy(base)
    sd = dict(P.named_parameters())
    with torch.no_grad():
        for n, t in adapter.items():
            sd[n].copy_(t)
    return P


def capture(model, ids):
    outs = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


def build(stand):
    E = copy.deepcopy(M)
    layers = decoder_layers(E)
    for i, s in stand.items():
        layers[i] = s
    E.requires_grad_(False)
    return E


def distill(E, params, steps, lr=1e-3, kl_w=1.0, mse_w=1.0, bs=4, seed=0, only=None):
    g = torch.Generator().manual_seed(seed)
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    flat = [p for gr in groups for p in gr["params"]]
    for p in flat:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for s in range(steps):
        ids = wtrain[torch.randint(len(wtrain), (bs,), generator=g)]
        with torch.no_grad():
            tl, th = capture(M, ids)
        sl, sh = capture(E, ids)
        kl = F.kl_div(
            F.log_softmax(sl.float(), -1).flatten(0, 1),
            F.log_softmax(tl.float(), -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        keys = only if only is not None else list(range(L))
        mse = sum((((sh[i] - th[i]) ** 2).sum(-1) / (th[i] ** 2).sum(-1).clamp_min(1e-6)).mean() for i in keys) / len(
            keys
        )
        loss = kl_w * kl + mse_w * mse
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if s % 20 == 0 or s == steps - 1:
            log(f"  distill {s}: kl {float(kl):.3f} nmse {float(mse):.4f}")
    for p in flat:
        p.requires_grad_(False)


def grad_cos(E, layers, n=4):
    vs = []
    for model in (M, E):
        model.requires_grad_(False)
        ps = [p for i in layers for p in decoder_layers(model)[i].parameters()]
        for p in ps:
            p.requires_grad_(True)
        ids = wval[: n * 2]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        gr = torch.autograd.grad(loss, ps)
        vs.append(torch.cat([x.flatten() for x in gr]))
        for p in ps:
            p.requires_grad_(False)
    return float(F.cosine_similarity(vs[0], vs[1], dim=0))


def val_ratio(E):
    with torch.no_grad():

        def loss_of(m):
            ids = wval[:16]
            return float(
                F.cross_entropy(m(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            )

        return math.exp(loss_of(E) - loss_of(M))


RES = W / "results.jsonl"


def record(**kw):
    with open(RES, "a") as f:
        f.write(json.dumps(kw) + "\n")
    log(f"RESULT {kw}")


def reference(layers):
    key = f"ref_{'-'.join(map(str, layers))}_{FT_STEPS}"
    cache = W / (key + ".json")
    if cache.exists():
        return json.loads(cache.read_text())
    zs = ev(M)
    Mc = copy.deepcopy(M)
    tune(Mc, layers)
    ref = ev(Mc)
    out = {"zs": zs, "ref": ref}
    cache.write_text(json.dumps(out))
    log(f"reference {layers}: zs {zs:.4f} ref {ref:.4f}")
    return out


def tune_generic(E, layers, steps, lr=1e-4, seed=0):
    """Model owner: tune the adapter on the emulator with generic text (absorbs the emulator's repair)."""
    from shared.data import Example

    ex = [Example(b.clone(), b.clone()) for b in wtrain]
    cfg = TrainConfig(max_steps=steps, batch_size=4, seq_len=128, seed=seed, lr=lr)
    set_seed(seed)
    freeze_except_adapter(E, layers)
    train(E, ex, cfg, choice, pad_id=pad_id_for(tok), progress=False)
    E.requires_grad_(False)
    return {
        n: p.detach().clone()
        for n, p in E.named_parameters()
        if any(n.startswith(f"model.layers.{i}.") for i in layers)
    }


def run(name, layers, replaced, mode, steps=0, kept=False, delta=0, **kw):
    R = reference(layers)
    hs = {i: Harmonizer(M.config.hidden_size, kw.pop("bottleneck", 64)) for i in replaced}
    stand = {i: (DroppedLayer() if mode == "drop" else HarmonizerLayer(hs[i])) for i in replaced}
    E = build(stand)
    t = time.perf_counter()
    if steps:
        params = [{"params": [p for h in hs.values() for p in h.parameters()]}]
        if kept:
            params.append(
                {
                    "params": [
                        p
                        for i, layer in enumerate(decoder_layers(E))
                        if i not in replaced and i not in layers
                        for p in layer.parameters()
                    ],
                    "lr": 1e-4,
                }
            )
        distill(E, params, steps, **kw)
    dt = time.perf_counter() - t
    ratio, gc = val_ratio(E), grad_cos(E, layers)
    extra = {}
    if delta:
        orig = {
            n: p.detach().clone()
            for n, p in E.named_parameters()
            if any(n.startswith(f"model.layers.{i}.") for i in layers)
        }
        cal = tune_generic(E, layers, delta)
        extra["cal_ratio"], extra["cal_grad_cos"] = val_ratio(E), grad_cos(E, layers)
    ezs = ev(E)
    ad = tune(E, layers)
    eft = ev(E)
    if delta:
        ad = {n: orig[n] + (ad[n] - cal[n]) for n in ad}
    pl = ev(plug(ad))
    r = (R["zs"] - pl) / (R["zs"] - R["ref"])
    record(
        name=name,
        layers=layers,
        replaced=sorted(replaced),
        mode=mode,
        steps=steps,
        kept=kept,
        ft_steps=FT_STEPS,
        distill_s=round(dt, 1),
        ppl_ratio=ratio,
        grad_cos=gc,
        emu_zs=ezs,
        emu_ft=eft,
        plug=pl,
        zs=R["zs"],
        ref=R["ref"],
        r=r,
        delta=delta,
        **extra,
        **kw,
    )


if __name__ == "__main__":
    sandwich = [0, 1, L - 2, L - 1]
    middle = list(range(2, L - 2))
    n_rep = int(os.environ.get("NREP", 13))
    rep = sorted({middle[int((j + 0.5) * len(middle) / n_rep)] for j in range(n_rep)})
    if os.environ.get("REPSET") == "loo":
        loo = json.loads((W / "loo.json").read_text())
        rep = sorted(sorted(middle, key=lambda i: loo[i])[:n_rep])
    log(f"replaced: {rep}")
    for exp in sys.argv[1:]:
        if exp == "loo":  # leave-one-out: the loss increase when each layer alone is dropped
            from model_owner_server.scaleot.importance import lm_loss

            ids = wval[:8]
            with torch.no_grad():
                base = float(lm_loss(M(input_ids=ids, use_cache=False).logits, ids))
                loo = []
                for i in range(L):
                    with swapped_layers(M, {i: DroppedLayer()}):
                        loo.append(float(lm_loss(M(input_ids=ids, use_cache=False).logits, ids)) - base)
            (W / "loo.json").write_text(json.dumps(loo))
            log(f"leave-one-out ranking: {sorted(range(L), key=lambda i: -loo[i])}")
        elif exp == "drop":
            run("drop", sandwich, rep, "drop")
        elif exp.startswith("harm"):
            run(exp, sandwich, rep, "harm", steps=int(exp[4:]))
        elif exp.startswith("kept"):
            run(exp, sandwich, rep, "harm", steps=int(exp[4:]), kept=True)
        elif exp.startswith("dropdelta"):
            run(exp, sandwich, rep, "drop", delta=int(exp[9:]))
        elif exp.startswith("hdelta"):  # hdelta<distill>_<delta>
            a, b = exp[6:].split("_")
            run(exp, sandwich, rep, "harm", steps=int(a), delta=int(b))
