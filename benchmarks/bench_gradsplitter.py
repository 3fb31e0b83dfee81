"""GradSplitter step timings: JAX (one vmapped jitted step for all modules) vs a PyTorch
baseline that follows the reference's structure (a Python loop over modules over a frozen
torch model, masks through a straight-through sign, Adam).

Per model (width 1, batch 64, 10 modules by default):
  * modularization step (masks + heads; forward, backward w.r.t. masks and heads, Adam);
  * head step: ours trains the heads on cached module features (masks are frozen in head
    phases), so its real cost is the head update plus the feature pass, done once per head
    phase: reported as "effective" = head update + feature forward / epochs in the phase (2);
    the reference back-propagates through the whole network in head steps too;
  * a whole-schedule estimate: one epoch of each phase type x the default schedule
    (5 head + 100 modularity + 40 head epochs) at ``--train-images`` images per epoch.

Compile time is reported apart; medians of ``--reps`` runs, JAX and PyTorch interleaved
in ``--rounds`` rounds; the ratio is the median of per-round ratios.

``--reference CHECKOUT`` also times the reference's own splitter code: the authors'
``GradSplitter`` and model classes imported from a checkout of their repository
(``CHECKOUT/src/splitters/<model>_splitter.py``, ``CHECKOUT/src/models/<model>.py``; supplied
by the user, never vendored here), loaded with our model's weights, its step being their
forward, their kernel term (``get_module_kernels``), cross-entropy and Adam; interleaved with
ours in the same rounds (width 1, RGB: the only shapes their classes build).

    python benchmarks/bench_gradsplitter.py [--models simcnn rescnn incecnn] [--reps 3]
        [--reference path/to/GradSplitter]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_jax, time_torch, write_json  # noqa: E402

from cnnsplit_jax.models import build_model  # noqa: E402
from cnnsplit_jax.modules.forward import default_chunk  # noqa: E402
from cnnsplit_jax.splitters import gradsplitter as gs  # noqa: E402
from cnnsplit_jax.splitters.gradsplitter.step import _features, _head_step, _mod_step  # noqa: E402


def torch_baseline(model, n_modules, alpha, batch, seed=0, device="cpu"):
    """Reference-structured PyTorch GradSplitter on ``device``: returns (mod_step, head_step)
    closures (asynchronous on CUDA: time them with ``time_torch(..., device=device)``)."""
    import torch
    from torch import nn

    from cnnsplit_jax.models.interop import torch_model

    torch.manual_seed(seed)
    net = torch_model(model).eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)

    class MySign(torch.autograd.Function):
        @staticmethod
        def forward(ctx, m):
            return (m > 0).float()

        @staticmethod
        def backward(ctx, g):
            return torch.clamp(g, -1.0, 1.0)

    points = [(p.name, p.size, len(p.layers)) for p in model.mask_points()]
    masks = [{n: nn.Parameter(torch.ones(c, device=device)) for n, c, _ in points} for _ in range(n_modules)]
    heads = [nn.Sequential(nn.Linear(model.num_classes, 10), nn.ReLU(), nn.Linear(10, 1)).to(device)
             for _ in range(n_modules)]
    mask_params = [m for d in masks for m in d.values()]
    head_params = [p for h in heads for p in h.parameters()]
    opt_mod = torch.optim.Adam(mask_params + head_params, lr=1e-3)
    opt_head = torch.optim.Adam(head_params, lr=1e-3)
    x = torch.randn(batch, model.in_channels, 32, 32, device=device)
    y = torch.arange(batch, device=device) % model.num_classes

    def forward(ratio):
        outs, kern = [], []
        for i in range(n_modules):  # the reference runs the modules one after another
            b = {n: MySign.apply(masks[i][n]) for n, _, _ in points}
            logits = net(x, b)
            outs.append(torch.sigmoid(heads[i](torch.relu(logits))))
            kern += [b[n] for n, _, mult in points for _ in range(mult)]
        scores = torch.cat(outs, 1)
        loss = nn.functional.cross_entropy(scores, y)
        return loss + ratio * torch.cat(kern).mean()

    def mod_step():
        opt_mod.zero_grad()
        forward(alpha).backward()
        opt_mod.step()

    def head_step():  # masks keep requires_grad, so this back-propagates through the network
        opt_head.zero_grad()
        forward(0.0).backward()
        opt_head.step()

    return mod_step, head_step


REFERENCE_CLASSES = {"simcnn": ("models.simcnn", "SimCNN"), "rescnn": ("models.rescnn", "ResCNN"),
                     "incecnn": ("models.incecnn", "InceCNN")}


def reference_steps(checkout, model, n_modules, alpha, batch, seed=0, x=None, y=None):
    """(mod_step, head_step, device) of the reference's own GradSplitter classes from
    ``checkout``, on ``model``'s weights, masks at N(1, 1) as ours (mid-search), on the device
    their module picks (``cuda`` when PyTorch sees one). ``x`` [B, 32, 32, 3] (normalised,
    NHWC) and ``y`` [B]: the batch (default: N(0, 1) images, labels cycling over classes)."""
    import torch
    import torch.nn.functional as F

    from cnnsplit_jax.models.interop import to_torch_state_dict

    src = Path(checkout) / "src"
    if not (src / "splitters" / f"{model.arch}_splitter.py").is_file():
        raise SystemExit(f"--reference {checkout}: expected a checkout of the GradSplitter repository "
                         f"(src/splitters/{model.arch}_splitter.py)")
    if model.width != 1.0 or model.in_channels != 3:
        raise SystemExit("--reference: the reference's classes build width-1 RGB models only")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    mod_name, cls_name = REFERENCE_CLASSES[model.arch]
    net = getattr(importlib.import_module(mod_name), cls_name)(num_classes=n_modules)
    net.load_state_dict({k: torch.tensor(np.array(v)) for k, v in to_torch_state_dict(model).items()}, strict=True)
    splitter_mod = importlib.import_module(f"splitters.{model.arch}_splitter")
    dev = splitter_mod.device  # their masks and heads go there; the frozen model must too
    net = net.to(dev)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its first head
        sp = splitter_mod.GradSplitter(net, "ones")
    sp.train()
    sp.model.eval()  # BN in inference mode, as their training loop sets it
    g = torch.Generator().manual_seed(seed)
    for name, p in sp.named_parameters():
        if "_conv_" in name:
            p.data = (torch.randn(p.shape, generator=g) + 1.0).to(dev)
    heads = [p for n, p in sp.named_parameters() if p.requires_grad and "head" in n]
    every = [p for p in sp.parameters() if p.requires_grad]
    opt_mod, opt_head = torch.optim.Adam(every, lr=1e-3), torch.optim.Adam(heads, lr=1e-3)
    x = torch.randn(batch, 3, 32, 32) if x is None else torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    y = torch.arange(batch) % n_modules if y is None else torch.from_numpy(np.asarray(y, np.int64))
    x, y = x.to(dev), y.to(dev)

    def step(opt, ratio):
        out = sp(x)
        loss = F.cross_entropy(out, y) + ratio * torch.mean(sp.get_module_kernels())
        opt.zero_grad()
        loss.backward()
        opt.step()

    return (lambda: step(opt_mod, alpha)), (lambda: step(opt_head, 0.0)), str(dev)


def bench(arch, width, batch, n_modules, reps, rounds, train_images, use_torch, module_chunk=None,
          reference=None, torch_device="cpu", model=None, images=None, labels=None):
    """One row of timings. ``model`` (an RGB kernel-mask model) replaces the fresh
    ``build_model(arch, ...)``; ``images`` [batch, 32, 32, 3] (normalised) and ``labels``
    replace the N(0, 1) batch: both sides then run the same weights on the same images."""
    if model is None:
        model = build_model(arch, num_classes=n_modules, in_channels=3, width=width, key=0)
    cfg = gs.GradSplitterConfig()
    state = gs.init(jax.random.key(0), model, cfg)
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3)) if images is None else jnp.asarray(images)
    y = jnp.arange(batch) % n_modules if labels is None else jnp.asarray(labels, jnp.int32)
    # give modules different masks (as mid-search), so nothing is trivially shared
    state = state._replace(masks={k: jax.random.normal(jax.random.key(len(k)), v.shape) + 1.0
                                  for k, v in state.masks.items()})
    feats = gs.module_features(model, state.masks, x)
    chunk = default_chunk(n_modules, cfg.module_chunk) if module_chunk is None else module_chunk
    mod = lambda s, x, y: _mod_step(model, jnp.float32(cfg.alpha), s, x, y, chunk=chunk)  # noqa: E731
    head = lambda s, f, y: _head_step(s, f, y)  # noqa: E731
    fpass = lambda m, x: _features(model, {k: gs.binarize(v) for k, v in m.items()}, x, chunk=chunk)  # noqa: E731
    row = {"model": arch, "width": width, "batch": batch, "modules": n_modules, "module_chunk": chunk}
    if use_torch:
        t_mod, t_head = torch_baseline(model, n_modules, cfg.alpha, batch, device=torch_device)
    if reference:
        ref_mod, ref_head, ref_dev = reference_steps(reference, model, n_modules, cfg.alpha, batch, x=images,
                                                     y=labels)
        row["reference_device"] = ref_dev
    r = {k: [] for k in ("mod", "head", "feat", "tmod", "thead", "rmod", "rhead")}
    for i in range(rounds):
        c, t, gf, _ = time_jax(mod, state, x, y, reps=reps)
        r["mod"].append(t)
        if i == 0:
            row.update(mod_compile_s=c, mod_gflop=gf)
        c, t, _, _ = time_jax(head, state, feats, y, reps=max(reps, 20))
        r["head"].append(t)
        c2, t, gff, _ = time_jax(fpass, state.masks, x, reps=reps)
        r["feat"].append(t)
        if i == 0:
            row.update(head_compile_s=c, feature_compile_s=c2, feature_gflop=gff)
        if use_torch:
            r["tmod"].append(time_torch(t_mod, reps=reps, device=torch_device)[0])
            r["thead"].append(time_torch(t_head, reps=reps, device=torch_device)[0])
        if reference:
            r["rmod"].append(time_torch(ref_mod, reps=reps, device=ref_dev)[0])
            r["rhead"].append(time_torch(ref_head, reps=reps, device=ref_dev)[0])
    med = statistics.median
    row.update(mod_step_s=med(r["mod"]), head_update_s=med(r["head"]), feature_pass_s=med(r["feat"]))
    row["head_step_effective_s"] = row["head_update_s"] + row["feature_pass_s"] / 2
    row["mod_gflops"] = row["mod_gflop"] / row["mod_step_s"]
    steps = -(-train_images // batch)
    sched = gs.phase_schedule(cfg)
    n_mod, n_head = sum(sched), len(sched) - sum(sched)
    n_head_phases = 1 + cfg.modularity_epochs // (cfg.cycle_mod + cfg.cycle_head)
    ours = n_mod * steps * row["mod_step_s"] + n_head * steps * row["head_update_s"] + n_head_phases * steps * row["feature_pass_s"]
    row.update(train_images=train_images, schedule_hours=ours / 3600)
    if use_torch:
        row.update(
            torch_mod_step_s=med(r["tmod"]), torch_head_step_s=med(r["thead"]),
            mod_ratio=med([a / b for a, b in zip(r["mod"], r["tmod"])]),
            head_ratio=med([(h + f / 2) / b for h, f, b in zip(r["head"], r["feat"], r["thead"])]),
        )
        ref = (n_mod * row["torch_mod_step_s"] + n_head * row["torch_head_step_s"]) * steps
        row.update(torch_schedule_hours=ref / 3600, schedule_ratio=ours / ref)
    if reference:
        row.update(
            reference_mod_step_s=med(r["rmod"]), reference_head_step_s=med(r["rhead"]),
            mod_ratio_vs_reference=med([a / b for a, b in zip(r["mod"], r["rmod"])]),
            head_ratio_vs_reference=med([(h + f / 2) / b for h, f, b in zip(r["head"], r["feat"], r["rhead"])]),
        )
        ref = (n_mod * row["reference_mod_step_s"] + n_head * row["reference_head_step_s"]) * steps
        row.update(reference_schedule_hours=ref / 3600, schedule_ratio_vs_reference=ours / ref)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["simcnn", "rescnn", "incecnn"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modules", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-images", type=int, default=13000,
                   help="images per epoch for the schedule estimate (a CIFAR-10 estimator: 8-19k)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--module-chunk", type=int, default=None,
                   help="modules per vmapped group (default: the library's backend default)")
    p.add_argument("--reference", default=None, metavar="CHECKOUT",
                   help="also time the reference's own splitter classes from this checkout of its repository")
    p.add_argument("--out", default="results/bench_gradsplitter.json")
    a = p.parse_args(argv)
    try:
        import torch  # noqa: F401

        use_torch = not a.no_torch
    except ImportError:
        use_torch = False
    rows = []
    print("| model | chunk | mod step s | head update ms | feature pass s | head step eff. s | mod GFLOP/s | compile mod/head s | torch mod s | torch head s | mod ratio | head ratio | schedule h (ours / torch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in a.models:
        r = bench(arch, a.width, a.batch, a.modules, a.reps, a.rounds, a.train_images, use_torch, a.module_chunk,
                  a.reference)
        rows.append(r)
        nan = float("nan")
        print(f"| {arch} | {r['module_chunk']} | {r['mod_step_s']:.2f} | {1e3 * r['head_update_s']:.2f} | {r['feature_pass_s']:.2f} | "
              f"{r['head_step_effective_s']:.2f} | {r['mod_gflops']:.0f} | {r['mod_compile_s']:.1f}/{r['head_compile_s']:.1f} | "
              f"{r.get('torch_mod_step_s', nan):.2f} | {r.get('torch_head_step_s', nan):.2f} | "
              f"{r.get('mod_ratio', nan):.2f} | {r.get('head_ratio', nan):.3f} | "
              f"{r['schedule_hours']:.1f} / {r.get('torch_schedule_hours', nan):.1f} |", flush=True)
    if a.reference:
        print("\n| model | ours mod step s | reference mod step s | **mod ratio** | ours head step eff. s | "
              "reference head step s | **head ratio** | schedule h (ours / reference) | **schedule ratio** |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['mod_step_s']:.2f} | {r['reference_mod_step_s']:.2f} | "
                  f"**{r['mod_ratio_vs_reference']:.2f}** | {r['head_step_effective_s']:.2f} | "
                  f"{r['reference_head_step_s']:.2f} | **{r['head_ratio_vs_reference']:.2f}** | "
                  f"{r['schedule_hours']:.1f} / {r['reference_schedule_hours']:.1f} | "
                  f"**{r['schedule_ratio_vs_reference']:.2f}** |")
    write_json(a.out, {"environment": environment(), "rows": rows})
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
