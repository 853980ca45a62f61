"""Detection inference on one GPU, path by path: a trained FCOS checkpoint, its val batches
held on the device, median of 5 interleaved rounds; AP and detections of the device NMS against
torchvision's ``batched_nms`` over the whole val set.

    python -m benchmarks.detect_infer_gpu CKPT OUT.json [--batches 8] [--profile OUT.txt]

``--profile``: torch.profiler tables (CUDA and CPU time) of the graphed path and of
``postprocess_padded`` alone, written to OUT.txt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from heads.nms import batched_greedy_nms  # noqa: E402
from tasks.engine.logging import env_info  # noqa: E402
from tasks.engine.graphs import GraphedInference  # noqa: E402
from tasks.engine.predict import load_task_model  # noqa: E402


def graphed_fn(fn, x):
    """``fn(x)`` captured as one CUDA graph (for the network-only and postprocess-only rows)."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static)

    def replay(inp):
        static.copy_(inp)
        g.replay()
        return out
    return replay


def same(p, q) -> bool:
    return all(torch.equal(p[k], q[k]) for k in ("labels", "boxes", "scores"))


def same_up_to_ties(p, q, cap: int) -> bool:
    """Equal scores, and per score value the same (label, box) multiset: candidates of equal score
    (common with bf16 logits) may be ordered differently by two sorts. The lowest score's group is
    not compared when ``cap`` detections were returned (the cut may fall inside it)."""
    if not torch.equal(p["scores"], q["scores"]):
        return False
    s = p["scores"]
    for v in s.unique().tolist():
        if len(s) == cap and v == s[-1].item():
            continue
        rows = [sorted(zip(d["labels"][d["scores"] == v].tolist(), d["boxes"][d["scores"] == v].tolist()))
                for d in (p, q)]
        if rows[0] != rows[1]:
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--untrained", action="store_true", help="fresh weights of the checkpoint's config (the worst "
                   "case: every candidate passes score_thresh); no COCO AP")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no graph, no compile rows)")
    p.add_argument("--profile", help="write torch.profiler tables here")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    spec, model, meta, cfg = load_task_model(a.ckpt, task="detect")
    if a.untrained:
        torch.manual_seed(0)
        model = spec.build_model(cfg, meta).eval()
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    head, trunk = model.head, model.backbone
    data = spec.build_data(cfg, device, train=False, quiet=True)
    held = []
    for i, (images, _) in enumerate(data.val):
        if images.shape[0] != cfg.data.eval_batch_size:
            break
        held.append(images)
        if len(held) >= a.batches:
            break
    x0 = held[0]
    size = tuple(x0.shape[-2:])
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    def net(x):
        return head(trunk(x), size)

    with torch.no_grad(), torch.autocast(**amp):
        raws = [net(x) for x in held]
    variants = {
        "shipped before: network + batched_nms per image (eager)": lambda x: head.postprocess_reference(net(x), size),
        "Detector(images): network + device NMS, a few syncs per batch (eager)": lambda x: model(x),
        "GraphedInference(Detector): one CUDA graph + one sync": GraphedInference(model, amp=True, capture_after=0),
        "network only, eager": net,
    }
    if cuda:
        with torch.autocast(**amp, cache_enabled=False), torch.no_grad():
            variants["network only, CUDA graph"] = graphed_fn(net, x0)
            variants["GraphedInference(compile=True): compiled, then one CUDA graph"] = GraphedInference(
                model, amp=True, capture_after=0, compile=True)
            compiled_net = torch.compile(net, dynamic=False)
            variants["network only, compiled + CUDA graph"] = graphed_fn(compiled_net, x0)
    post = {
        "postprocess_reference alone (batched_nms per image)": lambda r: head.postprocess_reference(r, size),
        "postprocess alone (device NMS, sync=True)": lambda r: head.postprocess(r, size),
        "postprocess_padded alone (no sync)": lambda r: head.postprocess_padded(r, size),
    }
    if cuda:
        with torch.no_grad():
            device_outs = {id(r): head.postprocess_device(r, size) for r in raws}
        post["postprocess_host alone (finish: the sync, slicing, redo of inexact images)"] = (
            lambda r: head.postprocess_host(device_outs[id(r)], size))

    def run_round(fn, inputs):
        sync()
        t0 = time.perf_counter()
        for x in inputs:
            out = fn(x)
        if isinstance(out, dict) and "num" in out:
            out["num"].sum().item()
        sync()
        return len(inputs) * x0.shape[0] / (time.perf_counter() - t0)

    results = {}
    if cuda:
        key = "GraphedInference(compile=True): compiled, then one CUDA graph"
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(**amp):
            variants[key](x0)
        sync()
        results["compile_and_capture_s"] = time.perf_counter() - t0
        print(f"GraphedInference(compile=True): first call (compile + capture) {results['compile_and_capture_s']:.1f} s")
    with torch.no_grad(), torch.autocast(**amp):
        for fn in [*variants.values(), *post.values()]:  # warm-up: compile, capture, autotune
            for _ in range(3):
                run_round(fn, raws if fn in post.values() else held)
        rounds = {k: [] for k in [*variants, *post]}
        for _ in range(5):
            for k, fn in variants.items():
                rounds[k].append(run_round(fn, held))
            for k, fn in post.items():
                rounds[k].append(run_round(fn, raws))
    results["img_per_s"] = {k: statistics.median(v) for k, v in rounds.items()}
    results["img_per_s_rounds"] = rounds
    results.update(env=env_info() if cuda else {"device": "cpu"}, ckpt=a.ckpt, batch_size=x0.shape[0],
                   image_size=list(size), nms_candidates=head.nms_candidates, nms_iterations=head.nms_iterations)

    def save():  # after every stage: a run stopped at its time limit keeps what it measured
        Path(a.out).write_text(json.dumps(results, indent=1))
    save()
    for k, v in results["img_per_s"].items():
        print(f"{v:10,.0f} img/s  {k}", flush=True)

    if a.profile and cuda:
        from torch.profiler import ProfilerActivity, profile
        graphed = variants["GraphedInference(Detector): one CUDA graph + one sync"]
        tables = []
        for name, fn, inputs in (("GraphedInference(Detector), 4 batches", graphed, held[:4]),
                                 ("postprocess_padded alone, eager, 4 batches",
                                  lambda r: head.postprocess_padded(r, size), raws[:4])):
            with torch.no_grad(), torch.autocast(**amp), profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run_round(fn, inputs)
            for key in ("cuda_time_total", "cpu_time_total"):
                tables.append(f"## {name}, by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=25))
        Path(a.profile).write_text("\n\n".join(tables))
        print(tables[0][:6000], flush=True)

    # prefix convergence and exactness by nms_iterations, on the held raw outputs
    results["iterations"] = {}
    for its in (8, 12, 16, 24, 32):
        saved = head.nms_iterations
        head.nms_iterations = its
        try:
            with torch.no_grad(), torch.autocast(**amp):
                row = {"exact": sum(int(head.postprocess_padded(r, size)["exact"].sum()) for r in raws),
                       "images": sum(int(r["cls_logits"][0].shape[0]) for r in raws)}
                if cuda:
                    row["postprocess_padded eager"] = statistics.median(
                        run_round(lambda r: head.postprocess_padded(r, size), raws) for _ in range(3))
        finally:
            head.nms_iterations = saved
        results["iterations"][str(its)] = row
        save()
        print("nms_iterations", its, row, flush=True)

    # exactness over the whole val set: the device path against batched_nms, image by image
    stats = {"images": 0, "exact": 0, "same": 0, "valid_max": 0, "valid_over_m": 0,
             "converged_after": {str(t): 0 for t in range(1, 9)}, "same_graphed_path": 0,
             "same_up_to_ties": 0, "same_graphed_path_up_to_ties": 0,
             "prefix_converged_after": {str(t): 0 for t in (4, 8, 12, 16, 24, 32)}}
    with torch.no_grad(), torch.autocast(**amp):
        for images, _ in data.val:
            s = tuple(images.shape[-2:])
            raw = head(trunk(images), s)
            padded = head.postprocess_padded(raw, s)
            new, ref = head.postprocess(raw, s), head.postprocess_reference(raw, s)
            boxes, scores, labels, valid = head._candidates(raw, s)
            m = min(head.nms_candidates, scores.shape[1])
            order = torch.where(valid, scores, -1.0).topk(m, dim=1).indices
            b = boxes.gather(1, order[..., None].expand(-1, -1, 4))
            lab, v = labels.gather(1, order), valid.gather(1, order)
            for t in range(1, 9):
                stats["converged_after"][str(t)] += int(batched_greedy_nms(b, lab, v, head.nms_thresh, t)[1].sum())
            for t in stats["prefix_converged_after"]:
                stats["prefix_converged_after"][t] += int(batched_greedy_nms(
                    b, lab, v, head.nms_thresh, int(t), top=head.detections_per_img)[1].sum())
            cap = head.detections_per_img
            graphed_path = head.postprocess_host({"padded": padded, "raw": raw}, s)
            stats["same_graphed_path"] += sum(same(p, q) for p, q in zip(graphed_path, ref))
            stats["same_graphed_path_up_to_ties"] += sum(same_up_to_ties(p, q, cap) for p, q in zip(graphed_path, ref))
            counts = valid.sum(1)
            stats["valid_max"] = max(stats["valid_max"], int(counts.max()))
            stats["valid_over_m"] += int((counts > m).sum())
            stats["images"] += images.shape[0]
            stats["exact"] += int(padded["exact"].sum())
            stats["same"] += sum(same(p, q) for p, q in zip(new, ref))
            stats["same_up_to_ties"] += sum(same_up_to_ties(p, q, cap) for p, q in zip(new, ref))
    results["exactness"] = stats
    save()
    print(json.dumps(stats), flush=True)

    # NMS settings: end to end (graphed and eager) and how many images the device path did alone
    results["variants"] = {}
    for name, settings in (("as the checkpoint's config", {}), ("nms_compile=true", {"nms_compile": True}),
                           ("nms_iterations=16", {"nms_iterations": 16}),
                           ("nms_iterations=16, nms_compile=true", {"nms_iterations": 16, "nms_compile": True})):
        saved = {k: getattr(head, k) for k in settings}
        try:
            for k, v in settings.items():
                setattr(head, k, v)
            fns = {"graphed": GraphedInference(model, amp=True, capture_after=0), "eager": lambda x: model(x)}
            row = {}
            with torch.no_grad(), torch.autocast(**amp):
                for key, fn in fns.items():
                    for _ in range(3):
                        run_round(fn, held)
                    row[key] = statistics.median(run_round(fn, held) for _ in range(5))
                row["exact"] = sum(int(head.postprocess_padded(r, size)["exact"].sum()) for r in raws)
                row["images"] = sum(int(r["cls_logits"][0].shape[0]) for r in raws)
        except Exception as e:  # a variant that fails (compile) is reported, not fatal
            row = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            for k, v in saved.items():
                setattr(head, k, v)
        results["variants"][name] = row
        save()
        print(name, row, flush=True)

    # COCO AP through the task's evaluation: the device path, then batched_nms
    metrics = {}
    if not a.untrained:
        metrics["GraphedInference (evaluation with train.graph_eval)"] = spec.evaluate(
            GraphedInference(model, amp=True), data, device, cuda)
        if cuda:
            metrics["GraphedInference(compile=True)"] = spec.evaluate(
                GraphedInference(model, amp=True, compile=True), data, device, cuda)
        metrics["postprocess on the device, sync=True (eager)"] = spec.evaluate(model, data, device, cuda)
        head.postprocess = head.postprocess_reference
        metrics["batched_nms per image (before)"] = spec.evaluate(model, data, device, cuda)
        del head.postprocess
    results["coco"] = metrics
    save()
    print({k: round(v["AP"], 5) for k, v in metrics.items()})


if __name__ == "__main__":
    main()
