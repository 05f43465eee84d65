#!/usr/bin/env python
"""Benchmarks of deepkd_det.core: optimizer step, decoupled-step memory, DeepKD iteration time.

Each case prints one JSON object per line with ``case``, ``value``, ``unit``, ``baseline``,
``ratio`` (= value / baseline; ``value`` is always the DeepKD-DET measurement) and details.
Timings are the median of ``repeats`` runs after ``warmup`` runs, on CPU.

    python bench/bench_core.py            # full run (a few minutes on 2 cores)
    python bench/bench_core.py --quick    # smoke run

Cases:
  optim_step_<net>            DeepKDOptimizer fold x3 + step (paper mode: torch's SGD kernels, once per
                              component) vs the best torch SGD (foreach on/off, fused)
  optim_step_vs_fused_<net>   the same against torch's fused SGD (goal <= 3.0)
  optim_step_own_<net>        the same on our own foreach update (sgd_kernel="own")
  optim_step_merged_<net>     DeepKD on KD: TOG and NCG share one buffer (fold x2 + step)
  optim_step_official_<net>   the same with compat="official"
  optim_vs_reference_<net>    DeepKDOptimizer vs a reference-style optimizer (see ReferenceStyle)
  step_memory_<scheme>        peak extra memory of one decoupled step, in parameter sizes
  teacher_forward_folded_bn[_channels_last]  prepared teacher forward vs the teacher as built
  iter_deepkd_<strategy>[_folded_teacher]   CIFAR R32x4 -> R8x4 iteration vs plain DKD
  iter_diffkd                 CIFAR R32x4 -> R8x4 DiffKD iteration (pre-pooling map + logits,
                              5 DDIM steps, torch SGD) vs plain DKD
  iter_gpd_dkd[_no_cbr], iter_deepkd_gpd_dkd  the GPD step (2x dynamic teacher sharing the
                              student's weights, core.gpd; clip 5) vs plain DKD, same run

Timings on a shared machine are only meaningful when nothing else runs: the 2-thread OpenMP
kernels slow down several-fold under oversubscription.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from deepkd_det.core.gpd import DYNAMIC_TEACHER, at_width, gpd_soft_target_loss, widen
from deepkd_det.core.losses import dkd_components
from deepkd_det.core.optim import DeepKDOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep
from deepkd_det.core.teacher import prepare_teacher

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
DELTAS = dict(tog=0.075, tcg=-0.075, ncg=0.05)


def emit(case: str, value: float, unit: str, baseline: float, **details) -> None:
    row = dict(case=case, value=round(value, 4), unit=unit, baseline=round(baseline, 4), ratio=round(value / baseline, 3))
    row.update(details)
    print(json.dumps(row), flush=True)


def median_seconds(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median time of each function; the repeats are interleaved (round robin) so that a change
    in machine load during the run affects every variant alike, not one of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------
# A reference-style optimizer: what docs/maths.md says the released DEEPKDTrainer does, written
# here from that description: gradients of TCG and NCG are kept as lists next to their params
# until step(); step() finds every parameter's membership by scanning those lists (quadratic in
# the number of tensors) and updates with separate per-tensor in-place operations, TOG, then NCG,
# then TCG, with the branch order and weight decay of the compat mode.
class ReferenceStyle:
    def __init__(self, params, lr, mus, weight_decay):
        self.params, self.lr, self.mus, self.wd = list(params), lr, mus, weight_decay
        self.mu_mean = sum(mus.values()) / 3
        self.buffers: Dict[str, Dict[torch.Tensor, torch.Tensor]] = {"tog": {}, "tcg": {}, "ncg": {}}
        self.kept: Dict[str, tuple] = {}

    @staticmethod
    def _member(t, items) -> bool:
        for x in items:
            if t is x:
                return True
        return False

    def collect(self, component, grads):
        pairs = [(p, g) for p, g in zip(self.params, grads) if g is not None]
        self.kept[component] = ([p for p, _ in pairs], [g for _, g in pairs])

    @torch.no_grad()
    def _update(self, component, params, grads, rules, extra_wd):
        for p, g in zip(params, grads):
            if component == "tcg":
                g = g.add(p, alpha=self.wd)
            buf = self.buffers[component].get(p)
            if buf is None:
                buf = self.buffers[component][p] = g.clone()
            else:
                for members, mu in rules:
                    if self._member(p, members):
                        buf.mul_(mu).add_(g)
                        break
                else:
                    if extra_wd:
                        g = g.add(p, alpha=self.wd)
                    buf.mul_(self.mu_mean).add_(g)
            p.add_(buf, alpha=-self.lr)

    def step(self):
        tp, tg = self.kept.get("tog", ([], []))
        cp, cg = self.kept.get("tcg", ([], []))
        np_, ng = self.kept.get("ncg", ([], []))
        mu = self.mus
        self._update("tog", tp, tg, [(cp, mu["tcg"]), (np_, mu["ncg"])], False)
        self._update("ncg", np_, ng, [(tp, mu["ncg"]), (cp, mu["tcg"])], True)
        self._update("tcg", cp, cg, [(tp, mu["tcg"]), (np_, mu["ncg"])], True)
        self.kept = {}


def _mus():
    return {c: MOMENTUM + d for c, d in DELTAS.items()}


# --------------------------------------------------------------------------------------------
def bench_optimizer(nets: List[str], warmup: int, repeats: int, device: str = "cpu") -> None:
    for net in nets:
        _bench_optimizer_net(net, warmup, repeats, device)


def _synced(fn: Callable[[], None], device: str) -> Callable[[], None]:
    if not device.startswith("cuda"):
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _bench_optimizer_net(net: str, warmup: int, repeats: int, device: str = "cpu") -> None:
    torch.manual_seed(0)
    shapes = [p.shape for p in getattr(torchvision.models, net)(weights=None).parameters()]
    grads = {c: [torch.randn(s, device=device) for s in shapes] for c in ("tog", "tcg", "ncg")}
    merged_sources = [frozenset({"tog", "ncg"})] * len(shapes)

    def fresh():
        return [nn.Parameter(torch.randn(s, device=device) * 0.01) for s in shapes]

    fns: Dict[str, Callable[[], None]] = {}
    for variant in ("foreach", "single", "fused"):
        params = fresh()
        for p, g in zip(params, grads["tog"]):
            p.grad = g
        kwargs = {"fused": True} if variant == "fused" else {"foreach": variant == "foreach"}
        try:
            sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **kwargs)
            sgd.step()
        except (RuntimeError, ValueError):  # no fused SGD kernel for this device / torch
            continue
        fns[f"sgd_{variant}"] = _synced(sgd.step, device)

    merged = DeepKDOptimizer(fresh(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, delta_tog=DELTAS["tog"],
                             delta_tcg=DELTAS["tcg"], delta_ncg=DELTAS["tog"], merge_equal_momenta=True)

    def merged_step(opt=merged):
        opt.fold("tcg", grads["tcg"])
        opt.fold("tog+ncg", grads["tog"], sources=merged_sources)
        opt.step()

    fns["deepkd_merged"] = _synced(merged_step, device)

    for compat in ("paper", "own", "official"):
        deltas = {f"delta_{c}": d for c, d in DELTAS.items()}
        opt = DeepKDOptimizer(fresh(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                              compat="paper" if compat == "own" else compat, **deltas)
        if compat == "own":
            opt.sgd_kernel = "own"  # our own foreach update instead of torch's SGD kernels

        def deepkd_step(opt=opt):
            for c in ("tog", "tcg", "ncg"):
                opt.fold(c, grads[c])
            opt.step()

        fns[f"deepkd_{compat}"] = _synced(deepkd_step, device)

    reference = ReferenceStyle(fresh(), LR, _mus(), WEIGHT_DECAY)

    def reference_step():
        for c in ("ncg", "tcg", "tog"):
            reference.collect(c, grads[c])
        reference.step()

    if device == "cpu":  # the reference-style loop is a CPU comparison (per-tensor ops, list scans)
        fns["reference"] = reference_step
    t = median_seconds(fns, warmup, repeats)
    sgd_times = {k[len("sgd_"):]: v for k, v in t.items() if k.startswith("sgd_")}
    best = min(sgd_times, key=sgd_times.get)
    sgd_best = sgd_times[best]
    info = dict(net=net, device=device, tensors=len(shapes), numel=sum(s.numel() for s in shapes),
                baseline_sgd=best, **{f"sgd_{k}_ms": round(v * 1e3, 3) for k, v in sgd_times.items()})
    emit(f"optim_step_{net}", t["deepkd_paper"] * 1e3, "ms", sgd_best * 1e3,
         note="paper mode on torch's SGD kernels, once per component", **info)
    if "fused" in sgd_times:
        emit(f"optim_step_vs_fused_{net}", t["deepkd_paper"] * 1e3, "ms", sgd_times["fused"] * 1e3, goal="<= 3.0",
             note="baseline = one torch SGD fused step; three fused kernels are the floor", **info)
    emit(f"optim_step_own_{net}", t["deepkd_own"] * 1e3, "ms", sgd_best * 1e3,
         note="paper mode on our own foreach update (sgd_kernel='own'), as before torch's kernels", **info)
    emit(f"optim_step_merged_{net}", t["deepkd_merged"] * 1e3, "ms", sgd_best * 1e3,
         note="TOG and NCG share one buffer (DeepKD on KD)", **info)
    emit(f"optim_step_official_{net}", t["deepkd_official"] * 1e3, "ms", sgd_best * 1e3, **info)
    if "reference" not in t:
        return
    ref_time = t["reference"]
    emit(f"optim_vs_reference_{net}", t["deepkd_paper"] * 1e3, "ms", ref_time * 1e3,
         note="baseline = reference-style optimizer (list scans, per-tensor updates)", **info)


# --------------------------------------------------------------------------------------------
# Memory: the CPU allocator reports every allocation and free to the profiler together with its
# running total of the bytes allocated *while profiling* (frees of older blocks, e.g. the saved
# activations of the forward pass, are not subtracted). The peak of that running total over the
# decoupled step + optimizer step is the transient memory the step needs; the optimizer state
# (momentum buffers), alive across steps, is added on top. Both are divided by the bytes of the
# trainable parameters. A ResNet-18 on a 2x3x32x32 input keeps activations (and their gradients)
# tiny next to the 47 MB of parameters, so the number is dominated by gradients and buffers.
def _profiled_peak_bytes(fn: Callable[[], None]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def _state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_memory() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 2])
    zt = torch.randn(2, 100)
    param_bytes = _state_bytes(p for p in model.parameters())

    def losses():
        zs = model(x)
        tcg, ncg = dkd_components(zs, zt, y, 1.0, 8.0, 4.0)
        return {"tog": F.cross_entropy(zs, y), "tcg": tcg, "ncg": ncg}

    results = {}
    for scheme in [*STRATEGIES, "sequential_official"]:
        compat = "official" if scheme.endswith("official") else "paper"
        opt = DeepKDOptimizer(model.parameters(), lr=1e-4, weight_decay=WEIGHT_DECAY, compat=compat)
        step = DecoupledStep(opt, scheme.split("_")[0])
        step(losses())
        opt.step()  # steady state: all buffers exist
        ls = losses()

        def run(ls=ls, step=step, opt=opt):
            step(ls)
            opt.step()

        peak = _profiled_peak_bytes(run)
        del ls, run
        state = _state_bytes(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
        results[scheme] = (peak + state) / param_bytes
        del opt, step

    # reference-style scheme: three backward passes into .grad, TCG/NCG gradients kept until step
    ref = ReferenceStyle(model.parameters(), 1e-4, _mus(), WEIGHT_DECAY)

    def reference_iteration(ls):
        for c in ("ncg", "tcg", "tog"):
            for p in model.parameters():
                p.grad = None
            ls[c].backward(retain_graph=c != "tog")
            ref.collect(c, [p.grad for p in model.parameters()])
        ref.step()

    reference_iteration(losses())
    ls = losses()
    peak = _profiled_peak_bytes(lambda: reference_iteration(ls))
    ref_state = _state_bytes(t for bufs in ref.buffers.values() for t in bufs.values())
    reference = (peak + ref_state) / param_bytes

    # plain SGD with momentum, one backward of the summed loss, for context
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def sgd_iteration(ls):
        sgd.zero_grad(set_to_none=True)
        sum(ls.values()).backward()
        sgd.step()

    sgd_iteration(losses())
    ls = losses()
    peak = _profiled_peak_bytes(lambda: sgd_iteration(ls))
    sgd_state = _state_bytes(t for s in sgd.state.values() for t in s.values() if isinstance(t, torch.Tensor))

    for scheme, value in results.items():
        extra = dict(goal="<= 4.0 (value)") if scheme == "streaming" else {}
        emit(f"step_memory_{scheme}", value, "x param bytes", reference,
             note="baseline = reference-style scheme", param_mb=round(param_bytes / 2**20, 2), **extra)
    emit("step_memory_torch_sgd", (peak + sgd_state) / param_bytes, "x param bytes", reference,
         note="context: torch SGD, one backward of the summed loss")


# --------------------------------------------------------------------------------------------
def _cifar_models():
    try:
        from deepkd_det.cls.models import build_model

        return build_model("resnet32x4", 100), build_model("resnet8x4", 100), "deepkd_det.cls.models"
    except ImportError:
        return _MiniCifarResNet(5), _MiniCifarResNet(1), "bench-local definition"


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)


class _MiniCifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2)x4: channels 32, 64, 128, 256 (n=1: ResNet-8x4, n=5: ResNet-32x4)."""

    def __init__(self, n, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, cin = [], 32
        for width, stride in ((64, 1), (128, 2), (256, 2)):
            for b in range(n):
                layers.append(_Block(cin, width, stride if b == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _gpd_iterations(student, teacher, x, y, dkd_args) -> Dict[str, Callable[[], None]]:
    """The GPD training step as the classifier runs it (deepkd_det/cls/distillers/gpd.py): dynamic
    teacher CE + DKD, student CE + DKD + 3 x soft target, one clipped update of the shared weights."""
    fns: Dict[str, Callable[[], None]] = {}

    def losses(shared):
        with torch.no_grad():
            zt = teacher(x)
        with at_width(shared, DYNAMIC_TEACHER):
            z_dt = shared(x)
        zs = shared(x)
        dt = F.cross_entropy(z_dt, y) + sum(dkd_components(z_dt, zt, y, **dkd_args))
        tcg, ncg = dkd_components(zs, zt, y, **dkd_args)
        return F.cross_entropy(zs, y) + dt + 3.0 * gpd_soft_target_loss(zs, z_dt), tcg, ncg

    for name, cbr in (("iter_gpd_dkd", True), ("iter_gpd_dkd_no_cbr", False)):
        shared = widen(student, 2, cbr=cbr)
        sgd = torch.optim.SGD(shared.parameters(), lr=1e-4, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def gpd_iteration(shared=shared, sgd=sgd):
            tog, tcg, ncg = losses(shared)
            sgd.zero_grad(set_to_none=True)
            (tog + tcg + ncg).backward()
            torch.nn.utils.clip_grad_norm_(shared.parameters(), 5.0)
            sgd.step()

        fns[name] = gpd_iteration
    shared = widen(student, 2, cbr=True)
    opt = DeepKDOptimizer(shared.parameters(), lr=1e-4, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    step = DecoupledStep(opt, "sequential", clip_norm=5.0)

    def deepkd_gpd_iteration():
        tog, tcg, ncg = losses(shared)
        step(opt.component_losses(tog=tog, tcg=tcg, ncg=ncg))
        opt.step()

    fns["iter_deepkd_gpd_dkd"] = deepkd_gpd_iteration
    return fns


def bench_iteration(batch: int, warmup: int, repeats: int) -> None:
    torch.manual_seed(0)
    teacher, student, source = _cifar_models()
    teacher.eval().requires_grad_(False)
    folded = prepare_teacher(teacher, fold_bn=True)
    folded_cl = prepare_teacher(teacher, fold_bn=True, channels_last=True)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 100, (batch,))
    dkd_args = dict(alpha=1.0, beta=8.0, temperature=4.0)

    sgd = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def dkd_iteration():
        with torch.no_grad():
            zt = teacher(x)
        zs = student(x)
        tcg, ncg = dkd_components(zs, zt, y, **dkd_args)
        sgd.zero_grad(set_to_none=True)
        (F.cross_entropy(zs, y) + tcg + ncg).backward()
        sgd.step()

    def teacher_forward(model):
        with torch.no_grad():
            model(x)

    fns: Dict[str, Callable[[], None]] = {
        "dkd": dkd_iteration,
        "teacher": lambda: teacher_forward(teacher),
        "teacher_folded": lambda: teacher_forward(folded),
        "teacher_folded_cl": lambda: teacher_forward(folded_cl),
    }
    variants = [(s, "", teacher) for s in STRATEGIES] + [(s, "_folded_teacher", folded) for s in STRATEGIES]
    variants.append(("sequential", "_folded_channels_last_teacher", folded_cl))
    for strategy, suffix, t_model in variants:
        opt = DeepKDOptimizer(student.parameters(), lr=1e-4, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        step = DecoupledStep(opt, strategy)

        def deepkd_iteration(opt=opt, step=step, t_model=t_model):
            with torch.no_grad():
                zt = t_model(x)
            zs = student(x)
            tcg, ncg = dkd_components(zs, zt, y, **dkd_args)
            step(opt.component_losses(tog=F.cross_entropy(zs, y), tcg=tcg, ncg=ncg))
            opt.step()

        fns[f"iter_deepkd_{strategy}{suffix}"] = deepkd_iteration

    diffkd_note = _add_diffkd_iteration(fns, student, teacher, x, y)
    fns.update(_gpd_iterations(student, teacher, x, y, dkd_args))

    t = median_seconds(fns, warmup, repeats)
    emit("teacher_forward_folded_bn", t["teacher_folded"] * 1e3, "ms", t["teacher"] * 1e3, batch=batch,
         note="baseline = the same teacher with its BatchNorm layers")
    emit("teacher_forward_folded_bn_channels_last", t["teacher_folded_cl"] * 1e3, "ms", t["teacher"] * 1e3,
         batch=batch, note="baseline = the same teacher with its BatchNorm layers")
    for case in fns:
        if case.startswith("iter_"):
            note = diffkd_note if case == "iter_diffkd" else ""
            emit(case, t[case] * 1e3, "ms", t["dkd"] * 1e3, batch=batch,
                 note="baseline = plain DKD iteration (one backward, torch SGD), teacher with BN" + note,
                 models=f"resnet32x4 -> resnet8x4 ({source})")


def _add_diffkd_iteration(fns, student, teacher, x, y) -> str:
    """Adds ``iter_diffkd`` (the classification DiffKD distiller, plain SGD) when available."""
    try:
        from deepkd_det.cls.distillers import DiffKD, StepContext
    except ImportError:
        return ""
    if not hasattr(student, "forward_feature_map"):
        return ""
    distiller = DiffKD(student, teacher, num_classes=100, student_channels=student.feature_dim,
                       teacher_channels=teacher.feature_dim)
    distiller.train()
    params = list(student.parameters()) + distiller.extra_parameters()
    sgd = torch.optim.SGD(params, lr=1e-4, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    ctx = StepContext(epoch=1)

    def diffkd_iteration():
        _, losses = distiller(x, y, ctx)
        sgd.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        sgd.step()

    fns["iter_diffkd"] = diffkd_iteration
    return "; DiffKD on the 256-channel 8x8 map and the 100 logits, 5 DDIM steps each"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run (fewer repeats, smaller cases)")
    parser.add_argument("--only", choices=["optim", "memory", "iter"], help="run one group of cases")
    parser.add_argument("--device", default="cpu", help="device of the optimizer cases (the others run on CPU)")
    parser.add_argument("--nets", default="", help="torchvision nets of the optimizer cases, comma-separated")
    args = parser.parse_args()
    if args.quick:
        nets, warmup, repeats, batch, it_warmup, it_repeats = ["resnet18"], 1, 3, 16, 1, 2
    else:
        nets, warmup, repeats, batch, it_warmup, it_repeats = ["resnet18", "resnet50"], 2, 11, 64, 1, 5
    if args.device.startswith("cuda"):
        warmup, repeats = 5, 50
    nets = args.nets.split(",") if args.nets else nets
    if args.only in (None, "optim"):
        bench_optimizer(nets, warmup, repeats, args.device)
    if args.only in (None, "memory"):
        bench_memory()
    if args.only in (None, "iter"):
        bench_iteration(batch, it_warmup, it_repeats)


if __name__ == "__main__":
    main()
