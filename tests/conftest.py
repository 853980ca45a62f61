import atexit
import ctypes
import os
import shutil
import signal
import sys
import tempfile

import pytest
import torch

# Two CPU cores on CI: more threads than cores only adds contention (under pytest-xdist, each
# worker process gets its share of the cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests never download: named weights resolve from an empty cache of this session (a test that
# needs a file puts it there, or points TORCH_HOME / HF_HOME elsewhere), offline. The settings
# made for a small classification set then take no ImageNet weights, whatever this host caches.
os.environ["ONETRUNK_OFFLINE"] = "1"
for _var, _prefix in (("TORCH_HOME", "onetrunk-tests-torch-"), ("HF_HOME", "onetrunk-tests-hf-")):
    os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_var], True)

# A test that hangs is killed by pytest-timeout with its xdist worker; a process that worker
# forked (a DataLoader or pool worker) would live on holding the worker's pipe, so pytest-xdist
# never sees the worker die and the whole session waits for CI's limit. Children die with it.
if sys.platform.startswith("linux"):
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    os.register_at_fork(after_in_child=lambda: _prctl(1, signal.SIGKILL))  # 1: PR_SET_PDEATHSIG


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """An untrained checkpoint of every task: ``{task: path}`` (read only: one set for the session)."""
    from tasks.engine.registry import TASKS
    from tests.fakes import write_task_checkpoint
    root = tmp_path_factory.mktemp("ckpts")
    return {task: write_task_checkpoint(root / f"{task}.pt", task) for task in TASKS}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty, offline torch hub cache: where named weights files are looked for."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ONETRUNK_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"
