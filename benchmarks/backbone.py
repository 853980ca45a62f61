"""Backbone throughput: this project's ResNet-18 / ResNet-50 against torchvision's and timm's.

Usage (from the repository root: ``benchmarks/`` is not installed with the package):
    python -m benchmarks.backbone [--out DIR] [--models resnet18,resnet50] [--batch 256] [--size 224]
                                  [--warmup 10] [--rounds 5] [--steps 10] [--no-compile]
                                  [--variants default|all|PATTERN,...] [--device cuda|cpu]
    (``python -m benchmarks.bench backbone ...`` is the same.)

Everything runs in one process on one device. Per model depth the three implementations get
the **same weights** (torchvision's initialisation, BatchNorm running statistics accumulated
on random batches so they are not trivial, copied into timm's model and into ours: our trunk
through ``load_weights``, the classifier's ``fc`` by hand); fp32 eval logits on a few images are
compared against torchvision's (``numerics_fp32``: max |difference|).

Variants (``impl/name``). Every implementation: ``train_eager``, ``train_compiled``,
``infer_eager``, ``infer_compiled``. Training step: ``zero_grad(set_to_none)``, forward under bf16
autocast, cross-entropy, backward, SGD(lr 0.1, momentum 0.9, weight decay 1e-4; the default
foreach implementation); inference: forward under ``no_grad`` + bf16 autocast. Models and
inputs are channels_last; ``torch.compile`` default mode compiles the model (not the optimizer).
Levers, ours only: ``train_*_fusedsgd`` (``SGD(fused=True)``), ``infer_*_bnfold`` (BatchNorm folded
into the convs, ``backbones.fuse_conv_bn``), ``infer_cudagraphs_bnfold``
(``torch.compile(mode="reduce-overhead")``: CUDA graphs). Opt-in (``--variants all`` or by name,
each costs another compilation): ``infer_autotune_bnfold`` (``max-autotune-no-cudagraphs``),
``infer_freezing`` (inductor ``freezing``: weights become constants, folded and pre-cast),
``train_cudagraphs_fusedsgd`` (``reduce-overhead`` training), ``train_tuned_fusedsgd``
(``reduce-overhead`` + inductor's ``coordinate_descent_tuning``: minutes of compilation),
``train_autotune_fusedsgd`` (``max-autotune-no-cudagraphs`` training: Triton conv / GEMM
templates and coordinate-descent tuned kernels, far longer compilation).

Timing. Inputs are synthetic and device-resident (``[batch, 3, size, size]`` channels_last,
random labels). Each variant first runs ``--warmup`` steps (compilation, cuDNN autotuning and
CUDA-graph capture happen there; their wall time is reported as ``warmup_s``), then ``--rounds``
rounds visit every variant in turn (round-robin, starting one later each round, so clock and
thermal drift hit all alike); a visit times ``--steps`` steps between two CUDA events (after a
synchronize). Reported: the median images/s over rounds, the ratio to the best peer
(torchvision or timm) of the same kind (train / infer), and peak memory: the variant's own
resident tensors after warm-up (weights, gradients, optimizer state, graph pools; the shared
input batch excluded) plus the largest transient allocation of its timed steps, from
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (CUDA-graph variants: the memory
reserved since the variant was built, as their graph pool is not counted as allocated). On a CPU (tests) the timer is
``time.perf_counter`` and memory is not reported. Results: ``<out>/bench_backbone.json`` (the
schema of ``benchmarks/schema.py``; ``numbers``: the per-depth summaries) and a Markdown table on
stdout.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from backbones import build_backbone, fuse_conv_bn
from benchmarks.schema import command_line, write_result
from heads import ClassificationHead, TaskModel

__all__ = ["VariantSpec", "variant_specs", "build_models", "bench_model", "main"]

IMPLS = ("torchvision", "timm", "ours")
PEERS = ("torchvision", "timm")
DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
NUM_CLASSES = 1000
TARGETS = {"train": 1.10, "infer": 1.25}  # the trunk's speed targets: ours / best peer
GIB = 2 ** 30


# ----------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class VariantSpec:
    """One timed configuration of one implementation."""

    impl: str                      # "ours" | "torchvision" | "timm"
    name: str                      # e.g. "infer_compiled_bnfold"
    kind: str                      # "train" | "infer"
    compile_mode: str | None = None  # None: eager; a torch.compile mode ("default", "reduce-overhead", ...)
    compile_options: tuple[tuple[str, Any], ...] = ()  # inductor options instead of a mode
    fused_sgd: bool = False
    bnfold: bool = False
    default: bool = True           # run unless --variants asks otherwise

    @property
    def key(self) -> str:
        return f"{self.impl}/{self.name}"

    @property
    def compiled(self) -> bool:
        return self.compile_mode is not None or bool(self.compile_options)

    @property
    def cudagraphs(self) -> bool:
        return self.compile_mode == "reduce-overhead" or dict(self.compile_options).get("triton.cudagraphs", False)


# reduce-overhead's CUDA graphs + inductor's coordinate-descent search over the block sizes of
# its Triton kernels (the BatchNorm / ReLU / residual work, half of a ResNet-50 training step's
# GPU time). On an H200 tuning alone cut the step's kernel time 35.4 -> 32.7 ms but left the
# step at 35.7 ms (kernels shorter than the step: likely waiting on the host's launches); with
# graphs the step took 34.2 ms.
TUNED_TRAIN_OPTIONS = (("triton.cudagraphs", True), ("coordinate_descent_tuning", True))


def variant_specs() -> list[VariantSpec]:
    """Every variant, training first, peers before ours (the order of the table)."""
    V = VariantSpec
    specs: list[VariantSpec] = []
    for impl in IMPLS:
        specs += [V(impl, "train_eager", "train"), V(impl, "train_compiled", "train", "default")]
    specs += [V("ours", "train_eager_fusedsgd", "train", fused_sgd=True),
              V("ours", "train_compiled_fusedsgd", "train", "default", fused_sgd=True),
              V("ours", "train_cudagraphs_fusedsgd", "train", "reduce-overhead", fused_sgd=True, default=False),
              V("ours", "train_autotune_fusedsgd", "train", "max-autotune-no-cudagraphs", fused_sgd=True,
                default=False),
              V("ours", "train_tuned_fusedsgd", "train", compile_options=TUNED_TRAIN_OPTIONS, fused_sgd=True,
                default=False)]
    for impl in IMPLS:
        specs += [V(impl, "infer_eager", "infer"), V(impl, "infer_compiled", "infer", "default")]
    specs += [V("ours", "infer_eager_bnfold", "infer", bnfold=True),
              V("ours", "infer_compiled_bnfold", "infer", "default", bnfold=True),
              V("ours", "infer_cudagraphs_bnfold", "infer", "reduce-overhead", bnfold=True),
              V("ours", "infer_autotune_bnfold", "infer", "max-autotune-no-cudagraphs", bnfold=True, default=False),
              V("ours", "infer_freezing", "infer", compile_options=(("freezing", True),), default=False)]
    return specs


def select_variants(patterns: str, *, compile: bool = True) -> list[VariantSpec]:
    """``patterns``: comma-separated ``default``, ``all`` or fnmatch patterns over ``impl/name``
    or ``name`` (``ours/infer_*``, ``*_compiled``); compiled variants are dropped without compile."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    specs = variant_specs()
    known = [s.key for s in specs]

    def chosen(s: VariantSpec) -> bool:
        return any(p == "all" or (p == "default" and s.default)
                   or fnmatch.fnmatchcase(s.key, p) or fnmatch.fnmatchcase(s.name, p) for p in wanted)

    for p in wanted:
        if p not in ("all", "default") and not any(fnmatch.fnmatchcase(k, p) or fnmatch.fnmatchcase(k.split("/")[1], p)
                                                   for k in known):
            raise ValueError(f"--variants: {p!r} matches no variant; known: {', '.join(known)}")
    return [s for s in specs if chosen(s) and (compile or not s.compiled)]


# ----------------------------------------------------------------------------- models

def build_ours(depth: str, num_classes: int = NUM_CLASSES) -> TaskModel:
    """This project's trunk + classification head (global average pool, linear)."""
    trunk = build_backbone(depth, out_features=("c5",))
    return TaskModel(trunk, ClassificationHead(trunk.spec("c5"), num_classes))


def _make_realistic(model: nn.Module, size: int, device: torch.device, batches: int = 2, batch: int = 8) -> None:
    """Give a freshly initialised torchvision ResNet the traits of a trained one that matter for
    comparing logits: the last norm of each residual branch scales by ~0.2 (trained ResNets
    learn small values there; at 1.0 a random ResNet-50 is chaotic and amplifies every rounding
    difference), and BatchNorm running statistics accumulated on random batches, so that
    eval-mode normalisation is not the identity and logits stay O(1)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    g = torch.Generator().manual_seed(0)
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            with torch.no_grad():
                last.weight.copy_(torch.empty_like(last.weight).uniform_(0.1, 0.3, generator=g))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None  # cumulative average over the calibration batches
        m.reset_running_stats()
    model.to(device).train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, device=device))
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.cpu().eval()


def build_models(depth: str, size: int, device: torch.device) -> dict[str, nn.Module]:
    """The three implementations of ``depth`` with identical weights, fp32, eval mode, on the CPU."""
    import timm
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, depth)(weights=None)
    _make_realistic(tv, size, device)
    state = tv.state_dict()
    tm = timm.create_model(depth, pretrained=False, num_classes=NUM_CLASSES)
    tm.load_state_dict(state)  # same key names as torchvision's ResNet; strict
    ours = build_ours(depth)
    ours.backbone.load_weights(state, verbose=False)  # strict: raises on a missing or misfit tensor
    ours.head.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    return {"torchvision": tv.eval(), "timm": tm.eval(), "ours": ours.eval()}


class _NoTF32:
    """fp32 really fp32 inside (cuDNN convolutions default to TF32 on Ampere and later)."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def numerics_fp32(models: dict[str, nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """fp32 eval logits of every implementation (and ours with BN folded) vs torchvision's.
    Returns torchvision's logits (the reference for the bf16 checks) and the differences."""
    device = x.device
    cands = dict(models, ours_bnfold=fuse_conv_bn(models["ours"]))
    logits = {}
    with _NoTF32(), torch.no_grad():
        for name, m in cands.items():
            m = copy.deepcopy(m).to(device, memory_format=torch.channels_last)
            logits[name] = m(x).float()
            del m
    ref = logits["torchvision"]
    out = {"batch": x.shape[0], "ref_max_abs_logit": ref.abs().max().item(),
           "max_abs_diff_vs_torchvision": {k: (v - ref).abs().max().item() for k, v in logits.items()
                                           if k != "torchvision"}}
    return ref, out


# ----------------------------------------------------------------------------- timing

@dataclass
class _Live:
    """A built, warmed-up variant: its step function and what it holds."""

    spec: VariantSpec
    step: Callable[[], Any]
    holds: list[Any] = field(default_factory=list)  # model, optimizer: freed with the variant
    resident: int = 0
    result: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    transient: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def _build(spec: VariantSpec, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> _Live:
    device = x.device
    model = fuse_conv_bn(base) if spec.bnfold else copy.deepcopy(base)
    model = model.to(device, memory_format=torch.channels_last)
    model.train(spec.kind == "train")
    fn: nn.Module | Callable = model
    if spec.compiled:
        fn = (torch.compile(model, options=dict(spec.compile_options)) if spec.compile_options
              else torch.compile(model, mode=spec.compile_mode))
    mark_step = spec.cudagraphs  # CUDA-graph trees: each call starts a new step (outputs of the last are dead)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    if spec.kind == "train":
        # The peers' plain recipe; fused=None lets torch pick foreach on CUDA.
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                              fused=True if spec.fused_sgd else None)

        def step() -> None:
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()

        return _Live(spec, step, [model, opt, fn])

    def infer() -> torch.Tensor:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast(**amp):
            return fn(x)

    return _Live(spec, infer, [model, fn])


def _timed(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` steps: CUDA events on a GPU (device time, launch gaps included)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e).strip() else ''}"


def bench_model(depth: str, specs: list[VariantSpec], *, batch: int, size: int, warmup: int, rounds: int,
                steps: int, device: torch.device, input_dtype: torch.dtype = torch.float32,
                check_batch: int = 8, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, warm up and time every variant of one depth; see the module docstring."""
    models = build_models(depth, size, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device, input_dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    n_check = min(check_batch, batch)
    ref, numerics = numerics_fp32(models, x[:n_check].float())
    log(f"{depth}: fp32 logits max |diff| vs torchvision {numerics['max_abs_diff_vs_torchvision']} "
        f"(logits up to {numerics['ref_max_abs_logit']:.3g})")
    out: dict[str, Any] = {"numerics_fp32": numerics, "variants": {}}

    live: list[_Live] = []
    for spec in specs:
        res: dict[str, Any] = {"impl": spec.impl, "variant": spec.name, "kind": spec.kind,
                               "compiled": spec.compiled, "compile_mode": spec.compile_mode,
                               "compile_options": dict(spec.compile_options) or None,
                               "optimizer": None if spec.kind == "infer" else
                               "SGD fused" if spec.fused_sgd else "SGD default (foreach on CUDA)",
                               "bnfold": spec.bnfold}
        out["variants"][spec.key] = res
        if device.type == "cuda":
            torch.cuda.empty_cache()  # a tight reserved baseline for the CUDA-graph accounting below
        base_mem, base_reserved = _allocated(device), _reserved(device)
        try:
            v = _build(spec, models[spec.impl], x, y)
            t0 = time.perf_counter()
            for i in range(warmup):
                v.step()
                if i == 0:
                    _sync(device)
                    res["first_step_s"] = round(time.perf_counter() - t0, 3)
            _sync(device)
            res["warmup_s"] = round(time.perf_counter() - t0, 3)
            if spec.kind == "infer":  # bf16 logits of what is timed vs the fp32 reference
                logits = v.step()[:n_check].float()
                res["logits_max_abs_diff_vs_fp32"] = (logits - ref).abs().max().item()
                del logits
            _sync(device)
            v.resident = _allocated(device) - base_mem
            if spec.cudagraphs:
                # CUDA-graph trees keep their tensors in a private pool whose blocks
                # memory_allocated no longer counts once captured: count what was reserved
                v.resident = max(v.resident, _reserved(device) - base_reserved)
            v.result = res
            live.append(v)
            log(f"{depth} {spec.key}: warm-up {res['warmup_s']:.1f} s")
        except Exception as e:  # a variant that fails (compiler, memory) is reported, the others still run
            res["error"] = _error(e)
            log(f"{depth} {spec.key}: FAILED {res['error']}")
        if "error" in res:  # out of the except block, so the traceback no longer pins its tensors
            v = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for v in order:
            if "error" in v.result:
                continue
            try:
                if device.type == "cuda":
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                before = _allocated(device)
                v.times.append(_timed(v.step, steps, device))
                if device.type == "cuda":
                    v.transient = max(v.transient, torch.cuda.max_memory_allocated(device) - before)
            except Exception as e:
                v.result["error"] = _error(e)
                log(f"{depth} {v.spec.key}: FAILED while timing: {v.result['error']}")

    for v in live:
        res = v.result
        if v.times:
            per_round = [steps * batch / t for t in v.times]
            res.update(img_per_s=statistics.median(per_round), img_per_s_rounds=[round(s, 1) for s in per_round],
                       step_ms_median=1e3 * statistics.median(v.times) / steps)
        if device.type == "cuda":
            res.update(resident_gib=v.resident / GIB, peak_gib=(v.resident + v.transient) / GIB)
    _ratios(out)
    return out  # the variants (models, optimizers, compiled code) die with this frame


def _ratios(out: dict[str, Any]) -> None:
    """``x_vs_best_peer`` on every row and a per-kind summary against the issue's targets."""
    rows = out["variants"]
    out["summary"] = {}
    for kind, target in TARGETS.items():
        timed = {k: r for k, r in rows.items() if r["kind"] == kind and r.get("img_per_s")}
        peers = {k: r for k, r in timed.items() if r["impl"] in PEERS}
        ours = {k: r for k, r in timed.items() if r["impl"] == "ours"}
        if not peers:
            continue
        best_peer = max(peers, key=lambda k: peers[k]["img_per_s"])
        for r in timed.values():
            r["x_vs_best_peer"] = r["img_per_s"] / peers[best_peer]["img_per_s"]
        if ours:
            best = max(ours, key=lambda k: ours[k]["img_per_s"])
            ratio = ours[best]["img_per_s"] / peers[best_peer]["img_per_s"]
            out["summary"][kind] = {"best_ours": best, "best_ours_img_per_s": ours[best]["img_per_s"],
                                    "best_peer": best_peer, "best_peer_img_per_s": peers[best_peer]["img_per_s"],
                                    "ratio": ratio, "target": target, "met": ratio >= target}


# ----------------------------------------------------------------------------- report

def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, Any]) -> str:
    lines = []
    for depth, res in results["models"].items():
        lines += [f"\n### {depth}\n",
                  "| impl | variant | img/s | x best peer | ms/step | peak GiB | warm-up s | bf16 logits max diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["variants"].values():
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['variant']} | failed: {r['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {r['impl']} | {r['variant']} | {_fmt(r.get('img_per_s'), ',.0f')} "
                         f"| {_fmt(r.get('x_vs_best_peer'), '.2f')} | {_fmt(r.get('step_ms_median'), '.2f')} "
                         f"| {_fmt(r.get('peak_gib'), '.2f')} | {_fmt(r.get('warmup_s'), '.1f')} "
                         f"| {_fmt(r.get('logits_max_abs_diff_vs_fp32'), '.2e')} |")
        num = res["numerics_fp32"]
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in num["max_abs_diff_vs_torchvision"].items())
        lines.append(f"\nfp32 eval logits on {num['batch']} images, max |diff| vs torchvision: {diffs} "
                     f"(logits up to {num['ref_max_abs_logit']:.3g}).")
        for kind, s in res.get("summary", {}).items():
            lines.append(f"{kind}: best ours {s['best_ours']} {s['best_ours_img_per_s']:,.0f} img/s vs best peer "
                         f"{s['best_peer']} {s['best_peer_img_per_s']:,.0f} = {s['ratio']:.2f}x "
                         f"(target {s['target']:.2f}x: {'met' if s['met'] else 'missed'})")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backbone", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="folder for bench_backbone.json")
    p.add_argument("--models", default="resnet18,resnet50", help=f"comma-separated, from {', '.join(DEPTHS)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over all variants")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only (quick)")
    p.add_argument("--variants", default="default",
                   help="comma-separated: default, all, or patterns over impl/name or name (e.g. 'default,infer_freezing')")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the synthetic input batch (all variants alike)")
    p.add_argument("--check-batch", type=int, default=8, help="images for the logits comparison")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    return p


CLAIM = ("Backbone throughput: this project's ResNet trunk + classifier against torchvision's and timm's with "
         "the same weights, training and inference images/s (ratio to the best peer) and peak memory")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    from tasks.engine.logging import env_info

    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_line("benchmarks.backbone", argv)
    args = get_args_parser().parse_args(argv)
    depths = [d.strip() for d in args.models.split(",") if d.strip()]
    bad = [d for d in depths if d not in DEPTHS]
    if bad or not depths:
        raise ValueError(f"--models {args.models!r}: choose from {', '.join(DEPTHS)}")
    for name in ("batch", "size", "rounds", "steps", "check_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    specs = select_variants(args.variants, compile=args.compile)
    if not specs:
        raise ValueError(f"--variants {args.variants!r} selects nothing" + ("" if args.compile else " without compile"))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # process-wide: every variant gets the same autotuning
    if args.compile:
        cfg = torch._dynamo.config
        # ~10 compiled variants share the frames of TaskModel / ResNet forward: lift the recompile cap
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    config = dict(vars(args), variants_run=[s.key for s in specs])
    results: dict[str, Any] = {"env": env_info(), "config": config, "variant_specs": [asdict(s) for s in specs],
                               "models": {}}
    log(json.dumps(results["env"]))
    t0 = time.perf_counter()
    for depth in depths:
        results["models"][depth] = bench_model(
            depth, specs, batch=args.batch, size=args.size, warmup=args.warmup, rounds=args.rounds,
            steps=args.steps, device=device, input_dtype=getattr(torch, args.input_dtype),
            check_batch=args.check_batch, log=log)
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        numbers = {d: r.get("summary", {}) for d, r in results["models"].items()}
        write_result(out / "bench_backbone.json", claim=CLAIM, numbers=numbers, command=command,
                     env=results["env"], extra={k: v for k, v in results.items() if k != "env"})
        # Free this depth before the next: compiled code, CUDA-graph pools, cached blocks.
        gc.collect()
        if args.compile:
            torch._dynamo.reset()
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(results))
    return results


if __name__ == "__main__":
    from tasks.engine.runner import run_cli
    run_cli(main)
