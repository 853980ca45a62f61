"""python -m benchmarks.backbone (also python -m benchmarks.bench backbone): the harness runs end to
end on a CPU with tiny settings."""
import json

import pytest
import torch

from benchmarks import bench
from benchmarks.backbone import select_variants

EAGER = {"torchvision/train_eager", "timm/train_eager", "ours/train_eager", "ours/train_eager_fusedsgd",
         "torchvision/infer_eager", "timm/infer_eager", "ours/infer_eager", "ours/infer_eager_bnfold"}
COMPILED = {"torchvision/train_compiled", "timm/train_compiled", "ours/train_compiled", "ours/train_compiled_fusedsgd",
            "torchvision/infer_compiled", "timm/infer_compiled", "ours/infer_compiled", "ours/infer_compiled_bnfold",
            "ours/infer_cudagraphs_bnfold"}


def test_variant_selection():
    assert {s.key for s in select_variants("default")} == EAGER | COMPILED
    assert {s.key for s in select_variants("default", compile=False)} == EAGER
    every = {s.key for s in select_variants("all")}
    assert every > EAGER | COMPILED and "ours/infer_autotune_bnfold" in every
    assert {s.key for s in select_variants("ours/infer_*bnfold")} == {
        "ours/infer_eager_bnfold", "ours/infer_compiled_bnfold", "ours/infer_cudagraphs_bnfold",
        "ours/infer_autotune_bnfold"}
    assert {s.key for s in select_variants("train_eager")} == {"torchvision/train_eager", "timm/train_eager",
                                                               "ours/train_eager"}
    tuned, = select_variants("ours/train_tuned_fusedsgd")
    assert tuned.cudagraphs and tuned.compiled and not tuned.default  # graphs: each step marks a new one
    assert not select_variants("ours/train_compiled_fusedsgd")[0].cudagraphs
    with pytest.raises(ValueError, match="matches no variant"):
        select_variants("default,ours/infer_turbo")


@pytest.fixture
def one_thread():
    # Hundreds of tiny ops: with 2 threads on a busy 2-core box OpenMP barriers make the run
    # anywhere from 6 to 60 s; one thread keeps it at a few seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow  # every variant of the benchmark, compiled ones included (~12 s)
def test_bench_backbone_cpu_smoke(tmp_path, capsys, one_thread):
    models = ["resnet18", "resnet50"]
    args = ["--out", str(tmp_path), "--models", ",".join(models), "--batch", "2", "--size", "32",
            "--warmup", "1", "--rounds", "2", "--steps", "1", "--no-compile", "--quiet", "--device", "cpu"]
    bench.main(["backbone", *args])  # forwarded to benchmarks.backbone
    res = json.loads((tmp_path / "bench_backbone.json").read_text())
    assert {"torch", "torchvision", "timm"} <= set(res["env"])
    # the result schema (benchmarks/schema.py): the exact command, the per-depth summaries as numbers
    assert res["schema"] == "onetrunk-bench-1" and res["claim"] and res["date"]
    assert res["command"].startswith("python -m benchmarks.backbone --out ") and "--no-compile" in res["command"]
    assert set(res["numbers"]) == set(models) and res["numbers"]["resnet18"] == res["models"]["resnet18"]["summary"]
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]
    assert list(res["models"]) == models
    for depth in models:
        r = res["models"][depth]
        assert set(r["variants"]) == EAGER
        # same weights in all three: fp32 eval logits agree (BN folding only reorders rounding)
        diffs = r["numerics_fp32"]["max_abs_diff_vs_torchvision"]
        assert set(diffs) == {"timm", "ours", "ours_bnfold"}
        assert all(d < 1e-4 for d in diffs.values()), diffs
        assert r["numerics_fp32"]["ref_max_abs_logit"] > 0.1
        for key, v in r["variants"].items():
            assert "error" not in v, (key, v["error"])
            assert v["img_per_s"] > 0 and len(v["img_per_s_rounds"]) == 2, key
            assert v["x_vs_best_peer"] > 0 and v["warmup_s"] >= 0, key
            if v["kind"] == "infer":  # bf16 autocast logits vs the fp32 reference: close, not equal
                assert 0 < v["logits_max_abs_diff_vs_fp32"] < 0.5, key
        assert set(r["summary"]) == {"train", "infer"}
        assert r["summary"]["infer"]["target"] == 1.25
    table = capsys.readouterr().out
    assert "| ours | infer_eager_bnfold |" in table and "### resnet50" in table
