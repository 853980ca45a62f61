"""What happens around the training loop, one callback per job (detectron2's hooks in spirit).

The ``Trainer`` calls each callback's hooks in list order, passing itself:

* ``before_fit``: once, before the first epoch of ``fit``;
* ``after_train_epoch(epoch, result)``: the epoch's steps are done (before its record is made);
* ``after_epoch(epoch, record)``: the epoch's ``metrics.jsonl`` record, which callbacks may add to
  (evaluation) before later ones write it;
* ``on_interrupt``: Ctrl-C or SIGTERM stopped the run (signals are held meanwhile);
* ``close``: the run ends, however it ends (signals held).

The Trainer's list: ``Evaluation``, ``GuardChecks``, ``CompileCache`` (with ``train.compile_cache``),
``EarlyStopping``, ``Checkpoints``, ``Curves`` (rank 0), ``Logging``. The order matters where one
callback reads what an earlier one did: the guard checks the metric the evaluation added;
``EarlyStopping`` decides from it whether this epoch is the run's last, which ``Checkpoints``
(``last.pt``) and ``Curves`` (the final picture) then follow; ``Checkpoints`` decides ``best.pt``
from the metric; ``Curves`` draws the records ``Checkpoints`` keeps.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .checkpoint import CheckpointWriter, remove_stale_temps, rng_state, set_rng_state, write_atomic
from .logging import Console, MetricsLog, TensorBoardLog, format_metrics
from .step import unwrap
from .viz import plot_curves

# The hooks receive the loop's ``Trainer`` (loop.py), which imports this module: typed loosely
# here so that the import runs one way only.
Trainer = Any

__all__ = ["EpochResult", "Callback", "Evaluation", "GuardChecks", "CompileCache", "EarlyStopping", "Checkpoints",
           "Curves", "Logging"]


@dataclass
class EpochResult:
    losses: dict[str, float]
    images: int
    seconds: float
    # what the step records about the epoch: the one that captured the CUDA-graph step gives
    # capture_s and capture_steps (warm-up, compile, capture included)
    extra: dict[str, float] = field(default_factory=dict)


class Callback:
    """Hooks around the loop; each does nothing unless overridden."""

    def before_fit(self, trainer: Trainer) -> None:
        pass

    def after_train_epoch(self, trainer: Trainer, epoch: int, result: EpochResult) -> None:
        pass

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        pass

    def on_interrupt(self, trainer: Trainer) -> None:
        pass

    def close(self, trainer: Trainer) -> None:
        pass


def _last(trainer: Trainer, epoch: int) -> bool:
    """``epoch`` (0-based) ends the run: the configured last, or the one early stopping chose."""
    return epoch + 1 == trainer.epochs or trainer.stopped_early == epoch + 1


def _improves(trainer: Trainer, value: Any) -> bool:
    """``value`` of the main validation metric is a new best (higher is better): what writes
    ``best.pt`` and what early stopping waits for."""
    return value is not None and (trainer.best is None or value > trainer.best)


class Evaluation(Callback):
    """``trainer.evaluate`` every ``every`` epochs and after the last (which writes the task's
    pictures); its metrics join the record as ``val_<key>``, with ``eval_time_s``."""

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, every)

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        last = _last(trainer, epoch)
        if last or (epoch + 1) % self.every == 0:
            t0 = time.perf_counter()
            metrics = trainer.evaluate(final=last)
            record.update({f"val_{k}": v for k, v in metrics.items()})
            record["eval_time_s"] = time.perf_counter() - t0


class GuardChecks(Callback):
    """The training guard's end-of-epoch checks (``guard.py``; the per-step ones run in the loop):
    every tensor of the trained state finite before evaluating or saving, and the validation
    metric not stuck at zero."""

    def after_train_epoch(self, trainer: Trainer, epoch: int, result: EpochResult) -> None:
        # before evaluating or saving: weights, BN statistics, EMA and optimizer all finite
        state = {"model": unwrap(trainer.model).state_dict(),
                 "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
                 "optimizer": trainer.optimizer.state_dict()["state"]}
        trainer.guard.check_state(state, epoch)

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        key = f"val_{trainer.main_metric}"
        if key in record:  # reduced: the same on every rank
            trainer.guard.check_metric(epoch, trainer.main_metric, record[key], (epoch + 1) * trainer.steps_per_epoch)


def _epochs_n(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


class EarlyStopping(Callback):
    """``train.patience`` N (None: off): the run ends after the first evaluation at which the main
    validation metric (the one ``best.pt`` follows) has not improved for N epochs or more since
    the epoch that scored the best. Epochs count and evaluations check: with ``train.eval_every``
    k the run ends within N + k - 1 epochs of its best. The metric is reduced over ranks, so every
    rank stops at the same epoch.

    Placed before ``Checkpoints``: the stopping epoch becomes the run's last (``trainer.stopped_early``,
    read by ``_last``), so it writes ``last.pt`` and the final curves, and best.pt stays the best
    epoch's. A run's last evaluation writes the task's pictures, and this epoch's evaluated before
    the stop was known: it evaluates once more with ``final`` (the same weights; the global RNG
    state is put back, so a resume trains on as if that evaluation had not run). ``Trainer.fit``
    prints ``trainer.stop_reason`` after the epoch's line and leaves the loop; the run then ends
    as any other (the returned record has ``stopped_early``).

    ``--resume`` of a run that stopped early (its ``last.pt`` has ``stopped_early``): with a patience
    that would stop it again it trains nothing and reports, as a finished run does, so a job
    resubmitted with ``--resume`` ends at once; with a larger patience, or none, it trains on,
    counting from the best epoch the checkpoint names. One line says which."""

    def __init__(self, patience: int | None) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"train.patience={patience!r}: epochs without improvement before the run ends, "
                             "1 or more (null: off)")
        self.patience = patience

    @staticmethod
    def _since(trainer: Trainer) -> tuple[int, str]:
        """The epoch (1-based) that scored ``trainer.best``, and how to name it. A checkpoint from
        before ``best_epoch`` was stored: the epoch it was resumed at (counting from there)."""
        if trainer.best_epoch is not None:
            return trainer.best_epoch, f"epoch {trainer.best_epoch}"
        return trainer.start_epoch, f"epoch {trainer.start_epoch} or earlier"

    def before_fit(self, trainer: Trainer) -> None:
        stopped = trainer.stopped_early  # restored by Trainer.resume
        if stopped is None:
            return
        best_epoch, where = self._since(trainer)
        stale = trainer.start_epoch - best_epoch
        if self.patience is not None and stale >= self.patience:
            trainer.stop_reason = (f"the run stopped early after epoch {stopped} (val_{trainer.main_metric} "
                                   f"{trainer.best:.4g} at {where}, {_epochs_n(stale)} before; train.patience="
                                   f"{self.patience}): nothing to train; a larger train.patience, or null, trains on")
            trainer.console(trainer.stop_reason)
            return
        now = "off" if self.patience is None else f"{self.patience}"
        trainer.console(f"the run stopped early after epoch {stopped}; train.patience is {now} now: training on "
                        f"({_epochs_n(stale)} since the best, {where})")
        trainer.stopped_early = None

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        value = record.get(f"val_{trainer.main_metric}")  # reduced: the same on every rank
        if self.patience is None or value is None or _improves(trainer, value) or _last(trainer, epoch):
            return
        best_epoch, where = self._since(trainer)
        stale = epoch + 1 - best_epoch
        if stale < self.patience:
            return
        trainer.stopped_early = epoch + 1
        trainer.stop_reason = (f"early stop at epoch {epoch + 1}: val_{trainer.main_metric} has not improved on "
                               f"{trainer.best:.4g} ({where}) for {_epochs_n(stale)} (train.patience={self.patience})")
        t0 = time.perf_counter()
        rng = rng_state()
        trainer.evaluate(final=True)  # the pictures of the run's last epoch
        set_rng_state(rng)
        record["eval_time_s"] = record.get("eval_time_s", 0.0) + time.perf_counter() - t0


def _file_kind(path: Path) -> str | None:
    """What ``path`` recognisably is (a checkpoint, a picture, compressed data), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    kinds = {b"PK\x03\x04": "zip file (a PyTorch checkpoint?)", b"\x89PNG": "PNG image", b"\xff\xd8\xff": "JPEG image",
             b"\x1f\x8b": "gzip file", b"%PDF": "PDF file"}
    return next((kind for magic, kind in kinds.items() if head.startswith(magic)), None)


class CompileCache(Callback):
    """``train.compile_cache``: inductor's caches pre-filled from a file
    (``torch.compiler.load_cache_artifacts``), for a run on the same torch / GPU to skip compile
    work; a file that did not load (or did not exist) is written after this run's first epoch.
    A file that loaded is never rewritten (it may be one shipped with the project)."""

    def __init__(self, path: str | Path, console: Callable[[str], None]) -> None:
        self.path = Path(path)
        self.console = console
        self.out: Path | None = None if self._load(self.path) else self.path

    @classmethod
    def from_config(cls, train_cfg: Any, console: Callable[[str], None]) -> CompileCache | None:
        if not train_cfg.compile_cache:
            return None
        if not train_cfg.compile:
            raise ValueError("train.compile_cache stores torch.compile's artifacts: it needs train.compile=true")
        return cls(train_cfg.compile_cache, console)

    def _load(self, path: Path) -> bool:
        """Whether ``path`` loaded. A file that does not load (another torch version, damaged) is
        reported and ignored: the run compiles as usual and rewrites it."""
        if path.is_dir():
            raise ValueError(f"train.compile_cache {path} is a folder: point it at a file (written after the first "
                             "epoch)")
        if not path.is_file():
            self.console(f"train.compile_cache: {path} does not exist yet; it is written after the first epoch")
            return False
        kind = _file_kind(path)
        if kind is not None:  # a file that did not load is rewritten: never a user's checkpoint or picture
            raise ValueError(f"train.compile_cache {path} is a {kind}, not a torch.compile cache: it would be "
                             "overwritten after the first epoch; point train.compile_cache at another file")
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - any failure only costs the compile it would have saved
            getattr(self.console, "error", Console.error)(
                f"train.compile_cache: {path} was not loaded ({type(e).__name__}: {e}); compiling, and rewriting it "
                "after the first epoch")
            return False
        self.console(f"train.compile_cache: loaded {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return True

    def after_train_epoch(self, trainer: Trainer, epoch: int, result: EpochResult) -> None:
        if epoch == trainer.start_epoch and self.out is not None and trainer.main:
            artifacts = torch.compiler.save_cache_artifacts()  # compiled by now (outside the timing)
            if artifacts is not None:  # else nothing was compiled in this process
                write_atomic(self.out, lambda tmp: tmp.write_bytes(artifacts[0]))


class Checkpoints(Callback):
    """``best.pt``, ``last.pt`` and the epoch's ``metrics.jsonl`` line, in that order, written on
    the writer's background thread (rank 0): the log is never ahead of the checkpoints a resume
    can start from. Keeps ``trainer.best`` and ``best_epoch``, ``trainer.records`` (the log's records),
    ``trainer.saved_epoch`` (the epoch ``last.pt`` and its line hold) and ``best_saved_epoch``."""

    def __init__(self, writer: CheckpointWriter, log: MetricsLog, output: str | Path, *, save_every: int = 1,
                 main: bool = True) -> None:
        self.writer, self.log, self.output = writer, log, Path(output)
        self.save_every = max(1, save_every)
        self.main = main

    def before_fit(self, trainer: Trainer) -> None:
        if not self.main:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.output)  # of writes killed with an earlier run
        if trainer.start_epoch == 0:  # a fresh run: lines of one that never saved a checkpoint go
            self.log.truncate_after(0)
        trainer.records = self.log.records()

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        value = record.get(f"val_{trainer.main_metric}")  # reduced: the same on every rank
        is_best = _improves(trainer, value)
        if is_best:
            trainer.best, trainer.best_epoch = value, epoch + 1
        # best.pt before last.pt: a kill between them leaves a last.pt whose best is on disk
        paths = [self.output / "best.pt"] if is_best else []
        saves_last = _last(trainer, epoch) or (epoch + 1) % self.save_every == 0
        if saves_last:
            paths.append(self.output / "last.pt")
        if not self.main:
            return
        trainer.records.append(record)

        def log_line() -> None:
            self.log.append(record)
            if saves_last:  # last.pt and its line are on disk: what an interrupt can resume from
                trainer.saved_epoch = record["epoch"]
            if is_best:
                trainer.best_saved_epoch = record["epoch"]

        if paths:  # the log line once the checkpoints are on disk: never ahead of them
            self.writer.save(trainer.state_dict(epoch + 1, record), *paths, then=log_line)
        else:
            self.writer.wait()  # keep the lines in epoch order
            log_line()

    def on_interrupt(self, trainer: Trainer) -> None:
        # The checkpoint being written and its log line are finished (the loop holds a second
        # Ctrl-C meanwhile); then lines of epochs that no checkpoint holds go (train.save_every
        # > 1): the log is never ahead of the checkpoints a resume can start from.
        self.writer.wait()
        if self.main:
            kept = max(trainer.saved_epoch or 0, trainer.best_saved_epoch or 0)
            self.log.truncate_after(kept)
            trainer.records = [r for r in trainer.records if r.get("epoch", 0) <= kept]

    def close(self, trainer: Trainer) -> None:
        self.writer.wait()


def _epochs(records: list[dict[str, Any]]) -> list[Any]:
    return [r.get("epoch") for r in records]


class Curves(Callback):
    """``curves.png`` from ``trainer.records`` (rank 0). Redrawing costs ~0.2 s of host time: at
    most every ``every_s`` seconds, and at the end. After an interrupt the picture shows the
    epochs the log keeps (``Checkpoints`` runs first); with no epoch left the curves were this
    run's alone (a folder holding another run's results is refused or cleared first), so the
    picture goes too."""

    def __init__(self, path: str | Path, main_metric: str, every_s: float = 15.0) -> None:
        self.path, self.main_metric, self.every_s = Path(path), main_metric, every_s
        self._last = -math.inf  # the first epoch draws
        self._drawn: list[Any] = []  # the epochs the picture on disk shows

    def before_fit(self, trainer: Trainer) -> None:
        self._drawn = _epochs(trainer.records)  # the earlier run drew them

    def draw(self, records: list[dict[str, Any]], force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last > self.every_s:
            plot_curves(records, self.path, main_metric=self.main_metric)
            self._last, self._drawn = now, _epochs(records)

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        self.draw(trainer.records, force=_last(trainer, epoch))

    def on_interrupt(self, trainer: Trainer) -> None:
        if _epochs(trainer.records) == self._drawn:
            return
        if trainer.records:
            self.draw(trainer.records, force=True)
        else:
            self.path.unlink(missing_ok=True)


class Logging(Callback):
    """One console line per epoch and, with ``train.tensorboard``, the record as TensorBoard
    scalars (``metrics.jsonl`` is written by ``Checkpoints``, after the checkpoints)."""

    def __init__(self, tensorboard: TensorBoardLog | None = None) -> None:
        self.tensorboard = tensorboard

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.append(record)
        trainer.console(f"epoch {epoch + 1}/{trainer.epochs}  " + format_metrics(
            record, ["train_loss", f"val_{trainer.main_metric}", "train_img_per_s", "train_time_s"]))

    def close(self, trainer: Trainer) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
