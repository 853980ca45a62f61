"""GPU-only checks (``pytest -m gpu``): CUDA-graph training matches eager training."""
import copy

import pytest
import torch

from backbones import resnet18
from backbones.stem import with_plain_stem
from heads import ClassificationHead, Classifier
from tasks.engine.graphs import GraphedForwardBackward
from tasks.engine.optim import zero_momentum_buffers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model():
    trunk = resnet18(stem="cifar", in_chans=1)
    return Classifier(trunk, ClassificationHead(trunk.feature_info[-1], 10)).cuda().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp,compiled", [(False, False), (True, False), (False, True), (True, True)])
def test_cuda_graph_step_matches_eager(amp, compiled):
    """compiled: the graph captures inductor's kernels (train.compile + train.cuda_graph); the
    reference is then the same compiled model stepped without a graph (the same kernels: eager
    PyTorch differs from inductor by rounding, which ~9 SGD steps on noise amplify past 1e-3)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = _model().train()
    graphed = copy.deepcopy(eager)
    ref = torch.compile(eager) if compiled else eager
    batches = [(torch.randn(64, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (64,), device="cuda")) for _ in range(8)]
    batches.append((batches[0][0][:32], batches[0][1][:32]))  # a ragged batch runs eagerly
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    step = GraphedForwardBackward(torch.compile(graphed) if compiled else graphed, opt_g, amp=amp, warmup=2)
    torch.backends.cudnn.deterministic = True
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            le = ref(x, y)["cls"]
        opt_e.zero_grad(set_to_none=True)
        le.backward()
        opt_e.step()
        lg, _ = step(x, y)
        opt_g.step()
        tol = 2e-2 if amp else 1e-4
        torch.testing.assert_close(lg.float(), le.float(), rtol=tol, atol=tol)
    assert step.graph is not None
    for (n, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=5e-2 if amp else 1e-3, atol=5e-3 if amp else 1e-4, msg=n)
    torch.testing.assert_close(graphed.backbone.bn1.running_mean, eager.backbone.bn1.running_mean,
                               rtol=1e-2, atol=1e-3)


def test_cuda_graph_detection_step_with_padded_targets_matches_eager():
    from heads import Detector, FCOSHead
    from heads.detection import pad_targets

    torch.manual_seed(0)
    trunk = resnet18()
    eager = Detector(trunk, FCOSHead(trunk.feature_info, 5, fpn_channels=32), check_targets=False).cuda().train()
    graphed = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)

    def batch(n_boxes):
        xy = torch.rand(4, n_boxes, 2, generator=gen) * 80
        wh = 8 + torch.rand(4, n_boxes, 2, generator=gen) * 40
        per_image = [{"boxes": torch.cat([xy[i], xy[i] + wh[i]], -1), "labels": torch.randint(0, 5, (n_boxes,), generator=gen)}
                     for i in range(4)]
        t = pad_targets(per_image, multiple=8)
        return torch.randn(4, 3, 128, 128, generator=gen).cuda(), {k: v.cuda() for k, v in t.items()}

    batches = [batch(1 + i % 5) for i in range(6)] + [batch(11)]  # the last: M=16, runs eagerly
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.01, momentum=0.9)
    step = GraphedForwardBackward(graphed, opt_g, amp=False, warmup=2)
    torch.backends.cudnn.deterministic = True
    for x, t in batches:
        le = sum(eager(x, t).values())
        opt_e.zero_grad(set_to_none=True)
        le.backward()
        opt_e.step()
        lg, _ = step(x, t)
        opt_g.step()
        torch.testing.assert_close(lg, le, rtol=1e-3, atol=1e-4)
    assert step.graph is not None
    for (n, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("compiled", [False, True])
def test_fast_stem_matches_plain_stem_on_cuda(compiled):
    """SpaceToDepthConv2d (and, compiled, StemMaxPool's backward) = nn.Conv2d + nn.MaxPool2d."""
    torch.manual_seed(0)
    trunk = resnet18()
    fast = Classifier(trunk, ClassificationHead(trunk.feature_info[-1], 10)).cuda().train()
    plain = with_plain_stem(fast)
    x = torch.randn(4, 3, 63, 64, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    outs = []
    for model in (fast, plain):
        fn = torch.compile(model) if compiled else model
        loss = fn(x, y)["cls"]
        loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    for n, g in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][n], g, rtol=1e-3, atol=1e-4, msg=n)


def _graphed_ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from tasks.engine import distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    if torch.cuda.device_count() >= 2:
        device = distributed.init(torch.device("cuda"))  # NCCL, one GPU per rank, as under torchrun
    else:  # NCCL refuses two ranks on one GPU; gloo reduces CUDA tensors through the host
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = _model().to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), device_ids=[device.index])
        g = torch.Generator(device="cpu").manual_seed(1 + rank)
        x = torch.randn(32, 1, 28, 28, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (32,), generator=g).to(device)
        ddp(x, y)["cls"].backward()
        ref = {n: p.grad for n, p in ddp.module.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = GraphedForwardBackward(model, opt, amp=False, warmup=2)
        sync = distributed.GradientAllReduce(model.parameters())
        for _ in range(4):  # warm-up, capture, replays: the weights do not move (no optimizer step)
            step(x, y)
            sync()
        assert step.graph is not None
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-3, atol=1e-5, msg=n)
        if rank == 0:
            open(os.path.join(out, "ok"), "w").close()
    finally:
        distributed.destroy()


def test_graphed_step_with_gradient_all_reduce_equals_ddp(tmp_path):
    """train.cuda_graph under torchrun: graphed forward/backward + one flat all-reduce = DDP
    (2 processes: NCCL on 2 GPUs, or gloo sharing one GPU)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_graphed_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "ok").exists()


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "multitask"])
def test_predictor_on_cuda_agrees_with_the_cpu(task, tmp_path):
    """tasks.load on CUDA (bf16 autocast, channels_last) gives the CPU's fp32 answers up to bf16 rounding."""
    import numpy as np

    from tasks import load
    from tests.fakes import write_task_checkpoint

    path = write_task_checkpoint(tmp_path / "m.pt", task)
    gpu, cpu = load(path, device="cuda"), load(path, device="cpu")
    assert gpu.amp and gpu.channels_last and next(gpu.model.parameters()).is_cuda
    rng = np.random.default_rng(0)
    shape = (lambda h, w: (h, w)) if task == "classify" else (lambda h, w: (h, w, 3))
    images = [rng.integers(0, 255, shape(h, w), dtype=np.uint8) for h, w in ((40, 52), (64, 64), (90, 30))]
    for g, c in zip(gpu.predict(images), cpu.predict(images)):
        heads = (g, c) if task == "multitask" else ({task: g}, {task: c})
        if task == "classify":
            torch.testing.assert_close(g["probs"], c["probs"], atol=2e-2, rtol=0)
        if "segment" in heads[0]:
            a, b = heads[0]["segment"], heads[1]["segment"]
            assert a["mask"].shape == b["mask"].shape and not a["mask"].is_cuda
            assert (a["mask"] == b["mask"]).float().mean() > 0.95
        if "detect" in heads[0]:
            a, b = heads[0]["detect"], heads[1]["detect"]
            assert not a["boxes"].is_cuda and a["boxes"].dtype == torch.float32
            assert abs(len(a["boxes"]) - len(b["boxes"])) <= max(2, len(b["boxes"]) // 10)


def test_graphed_inference_equals_eager_detection_and_updates_weights():
    from heads import Detector, FCOSHead
    from tasks.engine.graphs import GraphedInference
    torch.manual_seed(0)
    trunk = resnet18()
    model = Detector(trunk, FCOSHead(trunk.feature_info, 5, fpn_channels=32)).cuda().eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.0)  # a few hundred candidates per image, not all of them
    graphed = GraphedInference(model, amp=False, capture_after=1)
    x = torch.randn(4, 3, 128, 128, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # eager, then captured, then replayed
            out, ref = graphed(x), model.head.postprocess_reference(model.head(model.backbone(x), (128, 128)),
                                                                     (128, 128))
            for a, b in zip(out, ref):
                assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["boxes"], b["boxes"])
        assert len(graphed.graphs) == 1
        model.head.cls_logits.bias.fill_(-30.0)  # an in-place weight change reaches the replay
        assert all(len(d["boxes"]) == 0 for d in graphed(x))
        graphed(x[:2])  # another shape: eager until seen again
        assert len(graphed.graphs) == 1


def test_compiled_nms_equals_eager():
    from heads.detection import batched_greedy_nms
    gen = torch.Generator().manual_seed(0)
    n, m = 4, 300
    xy = torch.rand(n, m, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, m, 2, generator=gen) * 30 + 1], -1).cuda()
    labels = torch.randint(0, 3, (n, m), generator=gen).cuda()
    valid = (torch.rand(n, m, generator=gen) > 0.1).cuda()
    for top in (None, 20):
        ref = batched_greedy_nms(boxes, labels, valid, 0.5, 12, top=top)
        out = batched_greedy_nms(boxes, labels, valid, 0.5, 12, top=top, compiled=True)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_graphed_inference_compiled_matches_eager():
    from heads import Detector, FCOSHead
    from tasks.engine.graphs import GraphedInference
    torch.manual_seed(0)
    trunk = resnet18()
    model = Detector(trunk, FCOSHead(trunk.feature_info, 5, fpn_channels=32)).cuda().eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.0)
    graphed = GraphedInference(model, amp=False, capture_after=0, compile=True)
    x = torch.randn(4, 3, 128, 128, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            out, ref = graphed(x), model(x)
            for a, b in zip(out, ref):
                assert abs(len(a["scores"]) - len(b["scores"])) <= 2
                k = min(len(a["scores"]), len(b["scores"]))
                torch.testing.assert_close(a["scores"][:k], b["scores"][:k], rtol=1e-3, atol=1e-3)
    assert len(graphed.graphs) == 1


def test_first_epoch_records_when_the_graphed_step_was_captured(tmp_path):
    """The epoch that captures the CUDA-graph step records the seconds and steps until then
    (warm-up and capture); later epochs do not."""
    import json

    from tasks import classify
    from tasks.engine.config import config_from_dict
    from tasks.engine.loop import Trainer

    cfg = config_from_dict(classify.ClassifyConfig, {
        "model": {"depth": 18, "in_chans": 1},
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant", "warmup_epochs": 0},
        "train": {"epochs": 2, "amp": True, "cuda_graph": True, "log_every": 2, "eval_every": 2}})
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda())
               for _ in range(6)]
    model = classify.build_model(cfg, {"class_names": [str(i) for i in range(10)]})
    trainer = Trainer("classify", cfg, model, batches, evaluate=lambda m, final: {"acc": 0.0}, main_metric="acc",
                      output=tmp_path, device=torch.device("cuda"), quiet=True)
    trainer.fit()
    first, second = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first["train_capture_steps"] == trainer.graphed.warmup + 1
    assert 0 < first["train_capture_s"] <= first["train_time_s"]
    assert "train_capture_s" not in second


def test_float16_graphed_step_with_loss_scaling_matches_eager_and_skips_overflow():
    """train.amp_dtype=float16: the graphed step backpropagates the scaled loss (the scale read
    at each replay), the fused SGD unscales on the device; an overflowing scale skips the step
    and is backed off, as eager GradScaler does."""
    torch.manual_seed(0)
    eager = _model().train()
    graphed = copy.deepcopy(eager)
    batches = [(torch.randn(64, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (64,), device="cuda")) for _ in range(8)]
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9, fused=True)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9, fused=True)
    zero_momentum_buffers(opt_e)  # as the Trainer does under float16: skipped first steps leave none unset
    zero_momentum_buffers(opt_g)
    # 2**24 overflows float16 gradients (the logits' alone reach ~2**18): the first steps are skipped
    # until the scale is backed off
    sc_e, sc_g = (torch.amp.GradScaler("cuda", init_scale=2.0 ** 24) for _ in range(2))
    sc_g.scale(torch.ones((), device="cuda"))
    step = GraphedForwardBackward(graphed, opt_g, amp=True, warmup=2, dtype=torch.float16, scaler=sc_g)
    before = graphed.backbone.conv1.weight.detach().clone()
    for i, (x, y) in enumerate(batches):
        with torch.autocast("cuda", dtype=torch.float16):
            le = eager(x, y)["cls"]
        opt_e.zero_grad(set_to_none=True)
        sc_e.scale(le).backward()
        sc_e.step(opt_e)
        sc_e.update()
        lg, _ = step(x, y)
        sc_g.step(opt_g)
        sc_g.update()
        if i == 0:
            torch.testing.assert_close(graphed.backbone.conv1.weight, before, rtol=0, atol=0)  # skipped
        torch.testing.assert_close(lg.float(), le.float(), rtol=2e-2, atol=2e-2)
    assert step.graph is not None
    assert sc_g.get_scale() == sc_e.get_scale() < 2.0 ** 24
    assert not torch.equal(graphed.backbone.conv1.weight, before)  # later steps did update
    assert all(torch.isfinite(p).all() for p in graphed.parameters())
    for (n, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-3, msg=n)


def test_float16_training_saves_and_resumes_the_loss_scale(tmp_path):
    from tasks import classify
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.engine.config import config_from_dict
    from tasks.engine.loop import Trainer

    def trainer(epochs, out):
        cfg = config_from_dict(classify.ClassifyConfig, {
            "model": {"depth": 18, "in_chans": 1},
            "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant", "warmup_epochs": 0},
            "train": {"epochs": epochs, "amp": True, "amp_dtype": "float16", "cuda_graph": True, "log_every": 2}})
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(16, 1, 28, 28, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda())
                   for _ in range(6)]
        model = classify.build_model(cfg, {"class_names": [str(i) for i in range(10)]})
        return Trainer("classify", cfg, model, batches, evaluate=lambda m, final: {"acc": 0.0}, main_metric="acc",
                       output=out, device=torch.device("cuda"), quiet=True)

    first = trainer(1, tmp_path / "a")
    assert first.scaler is not None and first.graphed.dtype == torch.float16
    first.fit()
    saved = load_checkpoint(tmp_path / "a" / "last.pt")["grad_scaler"]
    assert saved["scale"] == first.scaler.get_scale() > 0
    second = trainer(2, tmp_path / "b")
    second.resume(tmp_path / "a" / "last.pt")
    assert second.scaler.get_scale() == saved["scale"]
    second.fit()
    assert torch.isfinite(torch.tensor(second.records[-1]["train_loss"]))


@pytest.mark.parametrize("clip", [None, 1.0])
def test_guard_adds_no_host_sync_between_log_points_on_the_graphed_step(tmp_path, clip):
    """The training guard's per-step work stays on the device: every step that is not a log point
    runs under ``torch.cuda.set_sync_debug_mode("error")`` once the step is captured."""
    from tasks import classify
    from tasks.engine.config import config_from_dict
    from tasks.engine.loop import Trainer

    log_every = 4
    cfg = config_from_dict(classify.ClassifyConfig, {
        "model": {"depth": 18, "in_chans": 1},
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant", "warmup_epochs": 0, "clip_grad_norm": clip},
        "train": {"epochs": 1, "amp": True, "cuda_graph": True, "log_every": log_every}})
    g = torch.Generator().manual_seed(0)

    class Strict(list):
        def __iter__(self):
            try:
                for i, batch in enumerate(list.__iter__(self)):
                    strict = i >= 6 and (i + 1) % log_every != 0  # captured by then; log points sync
                    torch.cuda.set_sync_debug_mode("error" if strict else "default")
                    yield batch
            finally:
                torch.cuda.set_sync_debug_mode("default")

    batches = Strict((torch.randn(16, 1, 28, 28, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda())
                     for _ in range(16))
    model = classify.build_model(cfg, {"class_names": [str(i) for i in range(10)]})
    trainer = Trainer("classify", cfg, model, batches, evaluate=lambda m, final: {"acc": 0.5}, main_metric="acc",
                      output=tmp_path, device=torch.device("cuda"), quiet=True)
    trainer.fit()
    assert trainer.graphed.graph is not None and trainer.guard.ref is not None
