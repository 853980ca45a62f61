"""Several processes (torchrun / DDP) on the CPU: gloo backend, 2 processes, tiny data."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tasks import classify
from tasks.data.gpu_augment import BatchAugment
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.config import config_from_dict
from tasks.engine.loaders import TensorLoader
from tests.fakes import tiny_scenes_args, write_fake_fashion_mnist

# every test starts 2-3 processes that each import torch (8-15 s on 2 cores): the slow tier
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--device", "cpu", "--quiet", "--batch-size", "32", "--limit-train", "192", "--limit-val", "96",
         "--set", "optim.lr=0.01", "--set", "optim.warmup_epochs=0.5", "--set", "optim.schedule=cosine",
         # equal eval batches in one process and in each rank's half: identical arithmetic
         "--set", "data.eval_batch_size=16"]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m <args>`` (a free port, one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 2 processes, gloo

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, timeout: float = 240) -> None:
    """``fn(rank, *args)`` in 2 processes joined in a gloo group; fails instead of hanging."""
    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"the 2 processes did not finish within {timeout} s (a collective hung?)")


FM_META = {"class_names": [str(i) for i in range(10)]}


def _classify_cfg(**train):
    return config_from_dict(classify.ClassifyConfig, {
        "model": {"depth": 18, "in_chans": 1, "norm": "gn"},  # GroupNorm: no batch statistics
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant",
                  "warmup_epochs": 0},
        "train": {"epochs": 1, "amp": False, "channels_last": False, "log_every": 1, **train}})


def _one_step(cfg, batches, out: Path):
    """A Trainer's first epoch over ``batches``: (weights, epoch result)."""
    from tasks.engine.loop import Trainer, unwrap
    torch.manual_seed(0)
    model = classify.build_model(cfg, FM_META)
    trainer = Trainer("classify", cfg, model, batches, evaluate=lambda m, final: {}, main_metric="acc",
                      output=out, device=torch.device("cpu"), quiet=True)
    result = trainer.train_one_epoch(0)
    return unwrap(trainer.train_model).state_dict(), result, trainer


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    from tasks.engine import distributed
    from tasks.engine.loop import NonFiniteLossError
    from tasks.engine.metrics import ConfusionMatrix
    assert distributed.init(torch.device("cpu")) == torch.device("cpu")
    try:
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (rank, 2, rank == 0)
        assert distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item() == 3.0
        assert distributed.gather_lists([rank, rank]) == [0, 0, 1, 1]
        assert distributed.on_main(lambda: distributed.rank() + 10) == 10
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank]), torch.tensor([rank]))  # rank 0: one 0->0, rank 1: one 1->1
        assert cm.all_reduce().mat.diag().tolist() == [1, 1, 0]
        # the graphed DDP path: rank 0's weights everywhere, then gradients averaged in one flat reduce
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        with torch.no_grad():
            conv.weight.fill_(rank + 5.0)
        distributed.broadcast_module(conv)
        assert torch.equal(conv.weight, torch.full_like(conv.weight, 5.0))
        per_rank = [torch.arange(conv.weight.numel(), dtype=torch.float32).view(conv.weight.shape) * (r + 1)
                    for r in range(2)]
        conv.weight.grad = per_rank[rank].contiguous(memory_format=torch.channels_last)  # bias.grad: None
        distributed.GradientAllReduce(conv.parameters())()
        torch.testing.assert_close(conv.weight.grad, (per_rank[0] + per_rank[1]) / 2, rtol=0, atol=0)
        assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv.bias.grad, torch.zeros(4))
        loader = TensorLoader(torch.zeros(64, 1, 4, 4, dtype=torch.uint8), torch.arange(64), batch_size=8,
                              augment=BatchAugment((0.0,), (1.0,)), train=True, seed=3)  # rank and world from the group
        assert (loader.rank, loader.world, len(loader)) == (rank, 2, 4)

        # one DDP step, each rank half of the batch (the parent compares with the full batch)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        half = slice(8 * rank, 8 * rank + 8)
        state, result, trainer = _one_step(_classify_cfg(batch_size=8), [(x[half], y[half])], Path(out))
        if rank == 0:
            torch.save({"state": state, "losses": result.losses, "images": result.images}, Path(out) / "ddp.pt")
        assert not (Path(out) / "metrics.jsonl").exists()

        # a NaN loss on one rank stops both, naming the same first bad step
        bad = [(x[half], y[half]), (x[half] * (float("nan") if rank == 1 else 1.0), y[half]), (x[half], y[half])]
        trainer.train_loader, trainer.steps_per_epoch = bad, 3
        try:
            trainer.train_one_epoch(0)
            raise AssertionError("no NonFiniteLossError")
        except NonFiniteLossError as e:
            assert "epoch 1, step 2" in str(e), str(e)

        # SyncBatchNorm has no CPU implementation: a clear error, not a crash mid-step
        cfg = _classify_cfg(batch_size=8)
        cfg.model.norm = "syncbn"
        try:
            _one_step(cfg, [(x[half], y[half])], Path(out))
            raise AssertionError("syncbn on CPU was accepted")
        except ValueError as e:
            assert "syncbn needs CUDA" in str(e)
    finally:
        distributed.destroy()


def test_ddp_step_equals_one_process_full_batch_step(tmp_path):
    """Two ranks with 8 images each take the step one process takes with the 16 (SGD, GroupNorm);
    collectives, metric reduction and the non-finite check agree across ranks."""
    _spawn(_worker, _free_port(), str(tmp_path))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    state, result, _ = _one_step(_classify_cfg(batch_size=16), [(x, y)], tmp_path / "one")
    torch.manual_seed(0)
    initial = classify.build_model(_classify_cfg(), FM_META).state_dict()
    assert not torch.equal(state["head.fc.weight"], initial["head.fc.weight"])  # the step moved the weights
    for k, v in state.items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=0, atol=1e-5, msg=k)
    assert ddp["images"] == result.images == 16
    assert ddp["losses"]["loss"] == pytest.approx(result.losses["loss"], abs=1e-5)


# ----------------------------------------------------------------------------- torchrun end to end

@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=192, n_test=96)


@pytest.fixture(scope="module")
def ddp_run(fm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    loud = [a for a in QUICK if a != "--quiet"]  # to see who prints
    proc = torchrun("tasks.classify", *loud, "--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_torchrun_classify_rank0_writes_and_metrics_are_global(ddp_run, fm_dir, tmp_path):
    out, proc = ddp_run
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "confusion.png", "curves.png",
                                                     "last.pt", "metrics.jsonl"]
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2]  # one writer
    assert all(r["world_size"] == 2 and r["train_images"] == 192 for r in recs)  # both ranks' images
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 prints, rank 1 is quiet
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["world_size"], ckpt["steps_per_epoch"]) == (2, 2, 3)  # 96 per rank / 32
    # the metrics reduced over the two validation shards are those of the whole set in one process
    metrics = classify.main(["--eval-only", "--weights", str(out / "last.pt"), "--data-dir", str(fm_dir),
                             "--device", "cpu", "--limit-val", "96", "--output", str(tmp_path),
                             "--set", "data.eval_batch_size=16"])
    assert metrics["acc"] == pytest.approx(recs[-1]["val_acc"], abs=1e-9)
    assert metrics["per_class_acc"] == pytest.approx(recs[-1]["val_per_class_acc"], abs=1e-9)


def test_two_process_checkpoint_resumes_in_one_process(ddp_run, fm_dir, tmp_path, capsys):
    out, _ = ddp_run
    result = classify.main(QUICK + ["--data-dir", str(fm_dir), "--resume", str(out / "last.pt"), "--epochs", "3",
                                    "--output", str(tmp_path / "one")])
    assert result["epoch"] == 3
    ckpt = load_checkpoint(tmp_path / "one" / "last.pt")
    assert (ckpt["epoch"], ckpt["world_size"], ckpt["steps_per_epoch"]) == (3, 1, 6)
    assert ckpt["scheduler"]["last_epoch"] == 2 * 6 + 6  # two epochs' worth of 6-step epochs, then one more
    assert records(tmp_path / "one")[-1]["train_images"] == 192


def test_one_process_checkpoint_resumes_with_two(fm_dir, tmp_path):
    out = tmp_path / "run"
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)])
    proc = torchrun("tasks.classify", *QUICK[:2], "--data-dir", str(fm_dir), "--resume", "--output", str(out),
                    "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the schedule continues at step 3 of 6" in proc.stdout
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2] and recs[1]["world_size"] == 2 and "world_size" not in recs[0]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_torchrun_errors_are_one_line_per_rank(fm_dir, tmp_path):
    proc = torchrun("tasks.classify", *QUICK, "--data-dir", str(fm_dir), "--epochs", "1",
                    "--output", str(tmp_path / "r"), "--set", "model.norm=syncbn")
    assert proc.returncode != 0
    # each failing rank prints one line (torchrun may stop rank 1 before it does), no traceback
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert 1 <= len(lines) <= 2, proc.stderr
    assert all(x.startswith(("error: ", "error [rank 1]: ")) and "syncbn needs CUDA" in x for x in lines), lines
    assert f'File "{ROOT / "tasks"}' not in proc.stderr


def test_torchrun_segment_reduces_metrics(tmp_path):
    from tasks import segment
    args = ["--device", "cpu", "--quiet", "--batch-size", "4", "--config", "configs/segment/scenes_quick.yaml",
            *tiny_scenes_args(tmp_path / "data")]
    out = tmp_path / "seg"
    proc = torchrun("tasks.segment", *args, "--epochs", "1", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = records(out)[-1]
    assert rec["world_size"] == 2 and rec["train_images"] == 24  # 12 scenes per rank, 3 steps of 4
    assert (out / "segmentation.png").is_file()
    metrics = segment.main(args + ["--eval-only", "--weights", str(out / "last.pt"), "--output", str(tmp_path / "ev")])
    assert metrics["miou"] == pytest.approx(rec["val_miou"], abs=1e-9)
    assert metrics["pixel_acc"] == pytest.approx(rec["val_pixel_acc"], abs=1e-9)
