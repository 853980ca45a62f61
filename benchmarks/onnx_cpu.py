"""ONNX export on the CPU: max |onnxruntime - PyTorch| and latency of both, same process.

    python -m benchmarks.onnx_cpu --out OUT.json \
        [--weights runs/classify/<run>/best.pt ...] [--threads 2]

It writes untrained checkpoints of the shipped model shapes (latency does not depend on the
weights): a ResNet-18 classifier at 3x224x224, the FCOS detector and the FCN segmenter at
256x256; --weights adds trained checkpoints (exported from a temporary copy). Each is exported with ``python -m tasks.export`` (its --check gives the
differences), then the exported graph (onnxruntime, CPUExecutionProvider) and the same module
in PyTorch (eval, no_grad, float32) are timed at the training size: best and median of
--repeats runs after 2 warm-up runs, the two in turn within each repeat, both on --threads
threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


from tasks import classify, detect, export, segment  # noqa: E402
from tasks.data.preprocess import Preprocess  # noqa: E402
from tasks.engine.checkpoint import CKPT_FORMAT, atomic_save  # noqa: E402
from tasks.engine.config import config_to_dict  # noqa: E402

RGB = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _save(path: Path, task: str, cfg, model, meta) -> Path:
    atomic_save({"format": CKPT_FORMAT, "task": task, "config": config_to_dict(cfg), "model": model.state_dict(),
                 "ema": None, "meta": meta}, path)
    return path


def untrained_checkpoints(folder: Path) -> list[Path]:
    names = [f"class{i}" for i in range(10)]
    c = classify.ClassifyConfig()
    c.model.num_classes = 10
    c.data.dataset, c.data.image_size = "folders", 224  # an RGB classifier: an image-folders model
    d = detect.DetectConfig()
    s = segment.SegmentConfig()
    return [
        _save(folder / "classify_r18_224.pt", "classify", c, classify.build_model(c, {"class_names": names}),
              {"classes": names, **RGB, "image_size": 224}),
        _save(folder / "detect_r18_256.pt", "detect", d, detect.build_model(d, {"class_names": names}),
              {"class_names": names, **RGB, "image_size": 256}),
        _save(folder / "segment_r18_256.pt", "segment", s, segment.build_model(s, {"class_names": ["background", *names]}),
              {"class_names": ["background", *names], **RGB, "image_size": 256}),
    ]


def _times_ms(fns, repeats: int) -> list[tuple[float, float]]:
    """(best, median) wall time of each of ``fns``, run in turn within every repeat: on a shared
    machine load changes then hit both alike, and the best run is the least disturbed one."""
    for fn in fns * 2:  # warm-up
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [(1000 * min(ts), 1000 * statistics.median(ts)) for ts in times]


def bench(ckpt: Path, batches: list[int], threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    # --raw: the detector's network, as the recorded table says (detections in the graph add NMS)
    result = export.main(["--weights", str(ckpt), "--output", str(ckpt.with_suffix(".onnx")), "--raw"])
    task, model, meta = export.load_model(ckpt)
    size = Preprocess.from_meta(meta).size
    module = export.ExportModule(model, task).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = ort.InferenceSession(result["output"], options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches if task == "classify" else batches[:1]:
        x = torch.randn(batch, export.in_channels(model), size, size)
        feed = {"images": x.numpy()}
        with torch.no_grad():
            (torch_best, torch_med), (ort_best, ort_med) = _times_ms(
                [lambda: module(x), lambda: session.run(None, feed)], repeats)
        rows.append({"batch": batch, "size": size, "pytorch_ms_best": round(torch_best, 1),
                     "pytorch_ms_median": round(torch_med, 1), "onnxruntime_ms_best": round(ort_best, 1),
                     "onnxruntime_ms_median": round(ort_med, 1), "speedup_best": round(torch_best / ort_best, 2)})
        print(f"{ckpt.name}: batch {batch} at {size}px: PyTorch {torch_best:.1f} ms best / {torch_med:.1f} median, "
              f"onnxruntime {ort_best:.1f} / {ort_med:.1f} ms")
    return {"checkpoint": ckpt.name, "task": task, "opset": result["opset"],
            "max_abs_diff": result["max_abs_diff"], "latency": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="*", default=[], metavar="CKPT", help="trained checkpoints to add")
    p.add_argument("--out", required=True, metavar="JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)  # other processes on the machine skew the times
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = untrained_checkpoints(Path(tmp))
        for i, weights in enumerate(args.weights):  # exported from a copy: nothing lands beside the run
            ckpts.append(Path(tmp) / f"{i}_{Path(weights).name}")
            shutil.copyfile(weights, ckpts[-1])
        results = [bench(c, args.batches, args.threads, args.repeats) for c in ckpts]
        for r, source in zip(results[len(results) - len(args.weights):], args.weights):
            r["checkpoint"] = source
    record = {"date": time.strftime("%Y-%m-%d"), "cpu_threads": args.threads, "cpus": os.cpu_count(),
              "load_average_1min": [load_before, round(os.getloadavg()[0], 2)], "python": platform.python_version(),
              "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
