"""``xd-train CONFIG``: SimCLR pretraining and finetuning, one loop for both.

Read top to bottom: resolve the config and the run folder, build data, model, optimiser and
schedule, restore a checkpoint when resuming, then train epoch by epoch (validation, a
checkpoint and the curves after each), and finally save ``final.pt`` and ``encoder.pt`` and
score the test split with the final model.

SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's preemption, requeue, cancel or coming time limit)
stop the training at the next step boundary with a checkpoint, and the command exits with
128 + the signal number (:class:`StopSignals`); ``--resume`` continues the run from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from xdtrain import checkpoint, display, distributed, memcheck, preflight, provenance
from xdtrain.config import (
    Config,
    add_config_arguments,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
    seed_runs,
)
from xdtrain.data import build_loader, shard_folder
from xdtrain.errors import Interrupted, Stopped, UserError, run_cli
from xdtrain.evaluate import Collector, evaluate, precision, to_device, write_plots
from xdtrain.mlflow_log import MlflowLog
from xdtrain.models import export_encoder, get_model, parse_name
from xdtrain.monitor import KnnMonitor
from xdtrain.optim import build_optimizer, build_scheduler, load_optimizer_state
from xdtrain.progress import LineProgress, clock, make_progress, stamp
from xdtrain.runlog import METRICS, RunLog, environment, flat_params, plot_curves, read_metrics
from xdtrain.tasks import Task, get_task

log = logging.getLogger("xdtrain.train")
OWN_FILES = (
    "config.yaml",
    "env.json",
    "metrics.jsonl",
    "last.pt",
    "final.pt",
    "best.pt",
    "encoder.pt",
    "learning_curve.png",
    "tensorboard",
)
# keys that may change when a run is resumed: how long it runs and how it reports (and the
# kNN monitor's, see _free: it never changes the weights)
RESUMABLE_CHANGES = {
    ("train", "epochs"),
    ("train", "log_every"),
    ("train", "checkpoint_minutes"),
    ("train", "checkpoint_epochs"),
    ("train", "keep_last"),
    ("train", "save_best"),
    ("train", "figures_every"),
    ("run", "mlflow"),
    ("run", "mlflow_uri"),
    ("train", "max_nonfinite"),
    ("data", "workers"),
}


class NonFiniteStop(UserError):
    """Too many non-finite losses in a row; the run is left resumable."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """While entered, the signals of :data:`STOP_SIGNALS` only note that a stop was asked for.

    Slurm sends SIGTERM to every process of a job it preempts, requeues or cancels (and
    SIGKILL after ``KillWait``, about 30 s), and SIGUSR2 or SIGUSR1 ahead of a time limit when
    asked to (submitit: ``--signal=USR2@90``). Their default action ends the run at once,
    losing every step since the last checkpoint; noted instead, they let the training loop
    stop at the next step boundary with a checkpoint (:meth:`Trainer.train_epoch`).
    ``signum``: the first of them received, None before. Leaving restores the previous
    handlers. Ctrl-C (SIGINT) is not one of them: it interrupts at once, as it always did.
    Only the main thread can install handlers (Python runs them there); entered in another
    thread, this installs none and the signals keep their effect.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _note(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
                # restart the system calls it interrupts (SA_RESTART): under the default
                # action, the threads of C libraries (DALI, Gloo) never saw EINTR
                signal.siginterrupt(signum, False)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # None: a handler not installed from Python, which cannot be put back
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


# --------------------------------------------------------------------------- set-up


def resolve(config: Config) -> tuple[Config, Task]:
    """Check the config against its task and fill the task's defaults."""
    task = get_task(config.task)
    data = config.data
    if task.dataset is not None and data.dataset != task.dataset:
        raise UserError(
            f"data.dataset: task {task.name!r} trains on {task.dataset!r}, not {data.dataset!r}"
        )
    prefix = {"simclr": "simclr_", "unet": "unet_", "classifier": ""}[task.model_kind]
    name = config.model.name
    kind, _ = parse_name(name)  # None: a timm/<name> backbone, whose network is the task's
    if kind is not None and kind != task.model_kind:
        raise UserError(
            f"model.name: task {task.name!r} needs a {task.model_kind} model "
            f"({prefix or 'resnet'}… or timm/<name>), not {name!r}"
        )
    if not data.augment:
        config = dataclasses.replace(
            config, data=dataclasses.replace(data, augment=task.default_augment)
        )
    return absolute_paths(config), task


def absolute_paths(config: Config) -> Config:
    """``config`` with the shard folder and encoder weights as absolute paths.

    Relative paths are resolved against the working directory once, when the run starts, and
    stored resolved in the run's ``config.yaml``: ``xd-eval``, ``xd-report`` and a resume then
    read the same files from any directory. An empty ``data.shards`` is ``shards/<dataset>``.
    """
    data, model, monitor = config.data, config.model, config.monitor
    shards = Path(shard_folder(data)).expanduser().resolve()
    weights = model.encoder_weights
    if weights:
        weights = str(Path(weights).expanduser().resolve())
    watched = monitor.shards and str(Path(monitor.shards).expanduser().resolve())
    return dataclasses.replace(
        config,
        data=dataclasses.replace(data, shards=str(shards)),
        model=dataclasses.replace(model, encoder_weights=weights),
        monitor=dataclasses.replace(monitor, shards=watched),
    )


def prepare_folder(folder: Path, config: Config, resume: bool, force: bool) -> bool:
    """Check what is in ``folder``; return whether there is a run to resume."""
    ours = [name for name in OWN_FILES if (folder / name).exists()]
    if force and resume:
        raise UserError("--force starts over and --resume continues: choose one")
    if not ours:
        return False
    if force:
        return False  # rank 0 clears the folder
    if not resume:
        raise UserError(
            f"{folder}: holds a run already; add --resume to continue it or --force to start it "
            "over (or set --run-dir / run.name)"
        )
    saved_path = folder / "config.yaml"
    if saved_path.exists():
        saved = absolute_paths(load_config(saved_path))
        changed = _differences(config_to_dict(saved), config_to_dict(config))
        changed = [c for c in changed if c not in RESUMABLE_CHANGES and not _free(c, saved)]
        if changed:
            keys = ", ".join(".".join(c) for c in changed[:6])
            raise UserError(
                f"{saved_path}: --resume with a different config ({keys}); resume with the "
                "same config, or start over with --force"
            )
    return (folder / "last.pt").exists()


def _free(key: tuple[str, ...], saved: Config) -> bool:
    """Whether a monitor key may change on resume: ``monitor.every`` always, the others while
    the run had no monitor (its rows would otherwise mix two kinds of score in one curve)."""
    return key[0] == "monitor" and (key[1] == "every" or not saved.monitor.every)


def _differences(a: dict, b: dict, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, (*prefix, key))
        elif x != y:
            out.append((*prefix, key))
    return out


def owned(folder: Path) -> bool:
    """Whether ``folder`` holds anything xd-train writes."""
    return any((folder / name).exists() for name in OWN_FILES)


def clear_folder(folder: Path) -> None:
    """Remove what xd-train wrote in ``folder`` (``--force``), and nothing else."""
    for name in OWN_FILES + tuple(p.name for p in folder.glob(f"{provenance.KEPT}*")):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One run: :meth:`fit` trains it epoch by epoch and scores the test split.

    A stop signal while it trains (:class:`StopSignals`) makes every rank stop together at
    the next step boundary with ``last.pt`` written there, or after the epoch's checkpoint
    when it lands in the epoch's last step or validation (the last epoch's too: the resumed
    run then only scores the test split); :meth:`fit` then raises :class:`Stopped`. One
    during the final test evaluation is ignored: the run finishes."""

    def __init__(
        self,
        config: Config,
        task: Task,
        world,
        folder: Path,
        resume: bool,
        source: str = "the config",
    ):
        self.config, self.task, self.world, self.folder = config, task, world, folder
        self.resume = resume
        self.console = Console(stderr=True)
        train = config.train
        seed_everything(config.run.seed + world.rank, train.deterministic)
        if config.run.debug:
            torch.autograd.set_detect_anomaly(True)
        # everything the run reads, checked before the first step, and on every rank: a
        # problem on one rank stops all of them with one line
        distributed.agree(lambda: preflight.check_inputs(config, task, world.size))
        loaders = distributed.agree(self._loaders)
        self.train_loader, self.val_loader, self.test_loader = loaders
        self.classes = list(self.train_loader.shardset.classes)
        # the classes or regions of the task's per-name scores, to show them grouped
        self.names = list(task.metrics(self.classes, config).names)
        self.monitor = None
        if config.monitor.every:
            self.monitor = distributed.agree(lambda: KnnMonitor(config, world.rank, world.size))
        self.steps_per_epoch = len(self.train_loader)
        if train.limit_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, train.limit_batches)
        self.amp = precision(train.amp, world.device)
        self.model = self._wrap(distributed.agree(self._model))
        if world.main and world.device.type == "cpu":
            memcheck.check_step_memory(self.raw_model, config, source)
        global_batch = config.data.batch_size * world.size
        self.optimizer = build_optimizer(self.raw_model, config.optim, global_batch)
        self.scheduler = build_scheduler(
            self.optimizer, config.schedule, self.steps_per_epoch, train.epochs
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp.dtype == torch.float16 and world.device.type == "cuda"
        )
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.nonfinite = self.nonfinite_in_row = 0
        self.bad_samples = 0
        self.best: dict | None = None
        self.log: RunLog | None = None
        self.stop = StopSignals()
        self.progress = make_progress(self.console, enabled=False)
        self.lines = False  # job-log lines in place of the bar (no terminal)
        self.started = (time.monotonic(), 0)  # when and at which step this process began
        self.saved_at = time.monotonic()  # when last.pt was last written (or the start)

    def _loaders(self) -> tuple:
        """The train, val and test loaders of this rank (the test split is opened now, so a
        problem with it stops the run before training, not after)."""
        data, world = self.config.data, self.world
        common = dict(
            rank=world.rank, world_size=world.size, seed=self.config.run.seed,
            debug=self.config.run.debug,
        )  # fmt: skip
        return tuple(build_loader(data, split, **common) for split in preflight.SPLITS)

    def _model(self) -> torch.nn.Module:
        """The network on this rank's device, encoder weights loaded (no collective)."""
        cfg, world = self.config, self.world
        num_classes = cfg.model.num_classes or (None if cfg.task == "simclr" else len(self.classes))
        model = get_model(
            cfg.model.name,
            num_classes=num_classes,
            in_channels=cfg.data.channels,
            encoder_weights=cfg.model.encoder_weights,
            frozen_encoder=cfg.model.frozen_encoder,
            projection_dims=cfg.model.projection_dims,
            projection_sigmoid=cfg.model.projection_sigmoid,
            kind=self.task.model_kind,
            image_size=cfg.data.image_size,
        )
        self.load_report = model.encoder_load_report
        model.to(world.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.raw_model = model
        return model

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """SyncBatchNorm, DDP (which broadcasts rank 0's parameters) and compilation."""
        cfg, world = self.config, self.world
        if world.size > 1:
            if cfg.train.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.raw_model = model
            ids = [world.local_rank] if world.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.train.compile:
            model = torch.compile(model)
        return model

    # ---------------------------------------------------------------- checkpoints

    def state(self, rngs: list, loaders: list) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "nonfinite": self.nonfinite,
            "bad_samples": self.bad_samples,
            "best": json.dumps(self.best),
            "rng": rngs,  # one entry per rank
            "data": loaders,  # one entry per rank: what its training loader must remember
            "config": json.dumps(config_to_dict(self.config)),
        }

    def save(self, name: str) -> None:
        """Every rank calls this (the RNG states of all ranks are gathered); rank 0 writes."""
        self.saved_at = time.monotonic()
        rngs = distributed.gather_objects(checkpoint.rng_state())
        loaders = distributed.gather_objects(json.dumps(_loader_state(self.train_loader)))
        if self.world.main:
            checkpoint.save(self.folder / name, self.state(rngs, loaders))
            if self.log is not None:
                self.log.sync()

    def save_final(self) -> None:
        """The final model without what only resuming needs (optimiser, scheduler, scaler, RNG
        states): ``last.pt`` holds those, and leaving them out halves a finished run's size."""
        self.save_weights("final.pt", "final: the model the test score is of")

    def save_weights(self, name: str, role: str, epoch: int | None = None) -> None:
        """Rank 0 writes the model's weights as ``name``, with what they are (``role``) and
        the epochs trained (default: those finished)."""
        if self.world.main:
            state = {
                "model": self.raw_model.state_dict(),
                "epoch": self.epoch if epoch is None else epoch,
                "global_step": self.global_step,
                "best": json.dumps(self.best),
                "role": role,
                "config": json.dumps(config_to_dict(self.config)),
            }
            checkpoint.save(self.folder / name, state)

    def drop_stale_best(self) -> None:
        """A ``best.pt`` written after the step resumed from (a run killed between two
        checkpoints) holds weights this run's history no longer has: removed, with a line;
        the next better validation writes a new one."""
        path = self.folder / "best.pt"
        if not path.exists():
            return
        try:
            step = checkpoint.load(path).get("global_step", 0)
        except UserError:  # a torn file is as stale as a later one
            step = self.global_step + 1
        if step > self.global_step:
            path.unlink()
            self.console.print(
                f"{path}: written after step {self.global_step}, where the run resumes; "
                "removed (the next better validation writes it again)",
                soft_wrap=True,
                highlight=False,
            )

    def restore(self, path: Path) -> None:
        state = checkpoint.load(path)
        self.raw_model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.nonfinite, self.bad_samples = state["nonfinite"], state["bad_samples"]
        self.best = json.loads(state["best"])
        rngs = state["rng"]
        loaders = [json.loads(text) for text in state.get("data", [])]
        if hasattr(self.train_loader, "load_state_dict") and loaders:
            if len(loaders) == self.world.size:
                self.train_loader.load_state_dict(loaders[self.world.rank])
            else:  # another number of ranks: every rank knows every bad sample
                bad: dict[str, set] = {}
                for part in loaders:
                    for path, keys in part.get("bad", {}).items():
                        bad.setdefault(path, set()).update(keys)
                self.train_loader.load_state_dict({"bad": bad})
        if len(rngs) == self.world.size:
            checkpoint.set_rng_state(rngs[self.world.rank])
        else:  # resumed on another number of ranks: a fresh, rank-specific stream
            log.warning(
                "%s: saved with %d ranks, resumed with %d", path, len(rngs), self.world.size
            )
            seed_everything(self.config.run.seed + self.global_step + self.world.rank, False)

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict:
        cfg, world = self.config, self.world
        last = self.folder / "last.pt"
        if self.resume and last.exists():
            distributed.agree(lambda: self.restore(last))
            if world.main:
                self.drop_stale_best()
            finished = [r for r in read_metrics(self.folder / METRICS) if r["kind"] == "test"]
            if self.epoch >= cfg.train.epochs and finished:
                if world.main:
                    self.console.print(f"{self.folder}: finished already; nothing to do")
                return finished[-1]
        identity = distributed.agree(self._inputs)
        if world.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.resume and (self.folder / "final.pt").exists():  # trained longer
                kept = provenance.keep_finished(self.folder, self.epoch)
                self.console.print(
                    f"{self.folder}: finished at epoch {self.epoch} before; its final.pt, "
                    f"encoder.pt and evaluations are kept in {kept.name}/"
                )
            save_config(cfg, self.folder / "config.yaml")
            devices = (
                [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                if world.device.type == "cuda"
                else ["cpu"]
            )
            env = environment(world.size, devices) | {
                "precision": self.amp.name,
                "encoder_weights": dataclasses.asdict(self.load_report)
                if self.load_report
                else None,
                **identity,
            }
            provenance.write_env(self.folder, env, self.global_step if self.resume else None)
            tracker = None
            if cfg.run.mlflow:
                params = flat_params(config_to_dict(cfg))
                tracker = MlflowLog(self.folder, cfg, params, self.resume)
            self.log = RunLog(self.folder, self.global_step if self.resume else None, tracker)
        try:
            distributed.barrier()
            if self.monitor is not None and self.global_step == 0:
                self.watch(0)  # the untrained encoder: the baseline training must rise above
            progress = make_progress(self.console, enabled=world.main, every=cfg.train.log_every)
            self.progress = progress
            self.lines = world.main and isinstance(progress, LineProgress)
            self.started = (time.monotonic(), self.global_step)
            with self.stop, progress:
                while self.epoch < cfg.train.epochs:
                    if self.train_epoch(progress):
                        raise self.stopped()
                    self.validate()
                    self.step_in_epoch = 0
                    self.epoch += 1
                    # a signal during validation (or the epoch's last step) stops here
                    stop = distributed.any_true([self.stop.signum is not None], world.device)[0]
                    due = distributed.any_true([self.checkpoint_overdue()], world.device)[0]
                    if stop or due or self.epoch_checkpoint_due():
                        self.save("last.pt")
                    if world.main:
                        plot_curves(self.folder, self.task.primary)
                    if stop:
                        raise self.stopped()
                return self.finish()
        except BaseException:
            if self.log is not None and not self.log.closed:  # MLflow: not left RUNNING
                self.log.close("FAILED")
            raise

    def checkpoint_overdue(self) -> bool:
        """Whether ``train.checkpoint_minutes`` have passed since ``last.pt`` was last
        written by this process (or since it started), across epochs."""
        return time.monotonic() - self.saved_at > self.config.train.checkpoint_minutes * 60

    def epoch_checkpoint_due(self) -> bool:
        """Whether ``last.pt`` is written after the epoch just finished: every
        ``train.checkpoint_epochs``-th epoch, and after the last one when ``train.keep_last``
        (without it, ``final.pt`` and the test row mark the finished run)."""
        train = self.config.train
        if self.epoch >= train.epochs:
            return train.keep_last
        return bool(train.checkpoint_epochs) and self.epoch % train.checkpoint_epochs == 0

    def stopped(self) -> Stopped:
        """What every rank raises once they agreed to stop, ``last.pt`` written: the signal
        a rank received (perhaps another rank) and where the run stopped."""
        signum = next(s for s in distributed.gather_objects(self.stop.signum) if s is not None)
        if self.log is not None:
            self.log.close("KILLED")
        if self.step_in_epoch:
            where = f"at epoch {self.epoch + 1} step {self.step_in_epoch}"
        else:
            where = f"after epoch {self.epoch}"
        name = signal.Signals(signum).name
        return Stopped(f"{name}: checkpoint written {where}", signum, quiet=not self.world.main)

    def _inputs(self) -> dict | None:
        """Rank 0: the sha256 of what the run reads (:mod:`xdtrain.provenance`); a resume
        whose inputs changed since the run started is refused."""
        if not self.world.main:
            return None
        cfg = self.config
        identity = provenance.inputs_identity(
            self.train_loader.shardset.folder, cfg.model.encoder_weights
        )
        if self.resume:
            provenance.check_resume(self.folder, identity)
        return identity

    def train_epoch(self, progress) -> bool:
        """Train from ``step_in_epoch`` to the epoch's end; return whether a stop signal
        ended it earlier, at a step boundary, once ``last.pt`` was written there."""
        cfg, world, train = self.config, self.world, self.config.train
        model = self.model
        model.train()
        self.train_loader.set_epoch(self.epoch)
        batches = iter(self.train_loader)
        for _ in range(self.step_in_epoch):  # a mid-epoch checkpoint: replay to the position
            next(batches)
        bar = progress.add_task(
            f"epoch {self.epoch + 1}/{train.epochs}", total=self.steps_per_epoch, loss=None, lr=None
        )
        progress.update(bar, completed=self.step_in_epoch)
        window = _window()
        while self.step_in_epoch < self.steps_per_epoch:
            tick = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - tick
            self.bad_samples += batch.get("bad_samples", 0)
            batch = to_device(batch, world.device, train.channels_last)
            with self.amp.autocast():
                loss, _ = self.task.forward(model, batch, cfg)
            value = float(loss.detach())  # the step's one wait for the device
            due = self.checkpoint_overdue()
            # one collective per step: every rank skips a non-finite step, saves and stops
            # together (stops even when a stop signal reached one rank only)
            nonfinite, due, stop = distributed.any_true(
                [not math.isfinite(value), due, self.stop.signum is not None], world.device
            )
            if nonfinite:
                self.skip_step(value)
            else:
                self.nonfinite_in_row = 0
                self.optimise(loss)
                window["loss"] += value
                window["count"] += 1
            lr = window["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            self.scheduler.step()
            window["samples"] += len(batch["keys"])
            self.step_in_epoch += 1
            self.global_step += 1
            progress.update(bar, advance=1, loss=value, lr=lr)
            last = self.step_in_epoch == self.steps_per_epoch
            if self.global_step % train.log_every == 0 or last:
                self.log_train(window)
                window = _window()
            if (due or stop) and not last:  # at the last step, fit saves after validation
                self.save("last.pt")
                if stop:
                    break
        progress.remove_task(bar)
        return self.step_in_epoch < self.steps_per_epoch

    def optimise(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        if self.config.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.raw_model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self, loss: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += 1
        self.nonfinite_in_row += 1
        limit = self.config.train.max_nonfinite
        if self.world.main:
            log.warning(
                "non-finite loss (%s) at epoch %d step %d: step skipped (%d in a row)",
                loss,
                self.epoch + 1,
                self.step_in_epoch + 1,
                self.nonfinite_in_row,
            )
        if self.nonfinite_in_row >= limit:
            if self.log is not None:
                self.log.sync()
            # --resume refuses another learning rate or clipping: the run starts over
            lower = self.config.optim.lr / 10
            raise NonFiniteStop(
                f"{self.folder}: {limit} non-finite losses in a row at epoch {self.epoch + 1} "
                f"step {self.step_in_epoch + 1}; stopped. Start it over with a lower learning "
                f"rate or gradient clipping: rerun without --resume, with --force --set "
                f"optim.lr={lower:.3g} (or --set train.grad_clip=1.0)"
            )

    def log_train(self, window: dict) -> None:
        device = self.world.device
        seconds = max(time.perf_counter() - window["start"], 1e-9)
        count = distributed.total(window["count"], device)
        row = {
            "kind": "train",
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "loss": distributed.total(window["loss"], device) / count if count else None,
            "lr": window.get("lr", self.optimizer.param_groups[0]["lr"]),
            "samples_per_s": distributed.total(window["samples"], device) / seconds,
            "data_wait": distributed.mean(window["wait"] / seconds, device),
            "nonfinite_skipped": self.nonfinite,
            "bad_samples": int(distributed.total(self.bad_samples, device)),
        }
        if device.type == "cuda":  # rank 0's peak since the start of the process
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if self.log is not None:
            self.log.write(row)
        if self.lines:
            self.console.print(self.train_line(row), soft_wrap=True, highlight=False)

    def train_line(self, row: dict) -> str:
        """A job log's line for a ``train`` row: where the run is, the mean loss and the
        throughput of the steps since the last line, and the time the run still needs (the
        mean time per step of this process, validation included, times the steps left)."""
        train = self.config.train
        since, first = self.started
        done = self.global_step - first
        total = train.epochs * self.steps_per_epoch
        eta = (time.monotonic() - since) / done * (total - self.global_step) if done else None
        loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"
        return (
            f"{stamp()} epoch {row['epoch']}/{train.epochs} step "
            f"{self.step_in_epoch}/{self.steps_per_epoch} (run {self.global_step}/{total}) "
            f"loss {loss} lr {row['lr']:.3e} {row['samples_per_s']:.1f} samples/s "
            f"data wait {100 * row['data_wait']:.0f} % ETA {clock(eta)}"
        )

    def validate(self) -> None:
        distributed.broadcast_buffers(self.raw_model)  # every rank scores rank 0's model
        collector = None
        if self.log is not None and self.figures_due():
            collector = Collector(self.val_loader.shardset.layout.kind, FIGURE_SAMPLES)
        metrics = self.task.metrics(self.classes, self.config)
        result = evaluate(
            self.model,
            self.val_loader,
            self.task,
            self.classes,
            self.config,
            self.world.device,
            self.amp,
            collect=collector,
            metrics=metrics,
            progress=self.progress,
            label=f"val epoch {self.epoch + 1}/{self.config.train.epochs}",
        )
        if collector is not None:
            self.log_figures(collector, metrics)
        value = result.get(self.task.primary)
        better = value is not None and (
            self.best is None
            or (
                value > self.best["value"]
                if self.task.higher_is_better
                else value < self.best["value"]
            )
        )
        if better:
            self.best = {"epoch": self.epoch + 1, "value": value, "metric": self.task.primary}
            if self.config.train.save_best:
                role = (
                    f"best validation epoch {self.epoch + 1} ({self.task.primary} {value:.4f}); "
                    "chosen on the validation split, never the model of the reported test score"
                )
                self.save_weights("best.pt", role, self.epoch + 1)
        row = {"kind": "val", "epoch": self.epoch + 1, "step": self.global_step, **result}
        row["best_epoch"] = self.best["epoch"] if self.best else None
        if self.log is not None:
            self.log.write(row)
        if self.world.main:
            self.summary(row)
        if self.monitor is not None and self.monitor.due(self.epoch + 1, self.config.train.epochs):
            self.watch(self.epoch + 1)
        self.model.train()

    def figures_due(self) -> bool:
        """Whether this epoch's validation draws figures for TensorBoard: every
        ``train.figures_every``-th epoch and the last (not for SimCLR, which has none)."""
        every, epochs = self.config.train.figures_every, self.config.train.epochs
        epoch = self.epoch + 1
        return (
            self.task.model_kind != "simclr"
            and bool(every)
            and (epoch % every == 0 or epoch >= epochs)
        )

    def log_figures(self, collector: Collector, metrics) -> None:
        """The validation figures xd-eval draws (ROC curves, confusion matrix, overlays, Dice
        per case; rank 0's part of the split under DDP) as TensorBoard images ``val/<name>``
        at this step."""
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".figures-") as tmp:
            paths = write_plots(
                collector, metrics, self.classes, Path(tmp), "val", self.val_loader.shardset
            )
            tags = {f"val/{Path(p).stem.rsplit('_', 1)[0]}": Path(p) for p in paths}
            self.log.figures(tags, self.global_step)

    def watch(self, epoch: int) -> None:
        """A ``monitor`` row: the kNN score of the encoder after ``epoch`` (0: untrained)."""
        result = self.monitor(self.raw_model.encoder, self.world.device, self.amp)
        if not self.world.main:
            return
        row = {"kind": "monitor", "epoch": epoch, "step": self.global_step, **result}
        if self.log is not None:
            self.log.write(row)
        metric = next(k for k in ("knn_top1", "knn_auroc") if k in result)
        self.console.print(
            f"kNN monitor ({self.monitor.name}) after epoch {epoch}: {metric} "
            f"{result[metric]:.4f} (chance {result['knn_chance']:.4f}), "
            f"{result['knn_seconds']:.1f} s",
            soft_wrap=True,  # one line in a job log too
        )

    def summary(self, row: dict) -> None:
        """Every metric of a ``val`` row: tables on a terminal, lines in a job log."""
        epoch = f"epoch {row['epoch']}/{self.config.train.epochs}"
        if self.lines:
            head = f"{stamp()} val {epoch}: "
            for line in display.lines(row, self.names, head):
                self.console.print(line, soft_wrap=True, highlight=False)
            return
        for table in display.tables(row, self.names, f"{self.folder.name}: val, {epoch}"):
            self.console.print(table)
        for note in display.notes(row):
            self.console.print(note, soft_wrap=True, highlight=False)

    def finish(self) -> dict:
        world = self.world
        distributed.broadcast_buffers(self.raw_model)  # the model saved is the one scored
        self.save_final()
        if world.main:
            export_encoder(self.raw_model, self.folder / "encoder.pt")
        result = evaluate(
            self.model,
            self.test_loader,
            self.task,
            self.classes,
            self.config,
            world.device,
            self.amp,
            progress=self.progress,
            label="test",
        )
        row = {"kind": "test", "epoch": self.epoch, "step": self.global_step, **result}
        row["checkpoint"] = "final.pt"
        row["best_val_epoch"] = self.best["epoch"] if self.best else None
        row["best_val_value"] = self.best["value"] if self.best else None
        if self.log is not None:
            self.log.write(row)
            scores = {
                f"test/{k}": v
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_SCORES
            }
            self.log.hparams(flat_params(config_to_dict(self.config)), scores)
            curve = plot_curves(self.folder, self.task.primary)
            if curve is not None and self.log.mlflow is not None:
                self.log.mlflow.artifact(curve, "")
            self.log.close("FINISHED")
        if world.main and not self.config.train.keep_last:
            # the test row marks the run finished; what only training on needed goes
            (self.folder / "last.pt").unlink(missing_ok=True)
        return row


FIGURE_SAMPLES = 4  # segmentation slices drawn in TensorBoard's validation overlays
NOT_SCORES = ("epoch", "step", "time", "samples", "best_val_epoch", "best_val_value")


def _loader_state(loader) -> dict:
    """A loader's resume state (the DALI loader's known bad samples), or nothing."""
    return loader.state_dict() if hasattr(loader, "state_dict") else {}


def _window() -> dict:
    """Sums over the steps between two train rows of metrics.jsonl."""
    return {"loss": 0.0, "count": 0, "samples": 0, "wait": 0.0, "start": time.perf_counter()}


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xd-train",
        description="Train: SimCLR pretraining or a finetuning task, as the config says.",
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in its folder")
    parser.add_argument("--force", action="store_true", help="start the run folder over")
    parser.add_argument("--run-dir", help="run folder (default: run.output_dir/run.name)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="one run per seed, one after the other in this process (run.seed=SEED, run folder "
        "<folder>_s<SEED>): the imports and start-up are paid once",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config")
    args = parser.parse_args(argv)
    config, task = resolve(load_config(args.config, args.set))
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    runs = seed_runs(config, args.config, args.run_dir, args.seeds)
    resumes = [prepare_folder(folder, cfg, args.resume, args.force) for cfg, folder in runs]
    world = distributed.init(config.data.device)
    try:
        for (cfg, folder), resume in zip(runs, resumes, strict=True):
            train_one(cfg, task, world, folder, resume, args)
    finally:
        distributed.shutdown()
    return 0


def train_one(config: Config, task: Task, world, folder: Path, resume: bool, args) -> None:
    """One run of ``xd-train`` in ``folder``; on rank 0, its test scores on stdout."""
    try:
        distributed.agree(lambda: preflight.check_config(config, task, world, args.config))
        distributed.barrier()  # every rank has looked at the folder before rank 0 changes it
        if world.main and args.force:
            clear_folder(folder)
        done = finished_without_last(folder, config) if args.resume and not resume else None
        if done is None and args.resume and not resume and world.main and owned(folder):
            # nothing to resume from (stopped before its first checkpoint): started over,
            # without the events, scores and best.pt of the attempt before
            print(f"{folder}: no last.pt to resume from; the run starts over", file=sys.stderr)
            clear_folder(folder)
        if done is not None:
            if world.main:
                print(f"{folder}: finished already; nothing to do", file=sys.stderr)
                print(f"run: {folder}")
                print("\n".join(display.lines(done, display.names_in(done), "test: ")))
            return
        trainer = Trainer(config, task, world, folder, resume, args.config)
        row, names = trainer.fit(), trainer.names
        del trainer  # its loaders' pipelines and threads, before the next seed's
        gc.collect()
    except Stopped as stop:
        advice = f"{stop}; {resume_advice(folder, args.force)}"
        raise Stopped(advice, stop.signum, quiet=stop.quiet) from None
    except KeyboardInterrupt:
        raise Interrupted(resume_advice(folder, args.force), quiet=not world.main) from None
    if world.main:
        print(f"run: {folder}")
        print("\n".join(display.lines(row, names, "test: ")), flush=True)


def finished_without_last(folder: Path, config: Config) -> dict | None:
    """The test row of a run in ``folder`` that finished without keeping ``last.pt``
    (``train.keep_last: false``): its ``final.pt`` and test row exist; None otherwise.

    Raises UserError when such a run is asked for more epochs than it trained: without
    ``last.pt`` (optimiser, schedule and data order) it cannot go on."""
    if (folder / "last.pt").exists() or not (folder / "final.pt").exists():
        return None
    tests = [r for r in read_metrics(folder / METRICS) if r.get("kind") == "test"]
    if not tests:
        return None
    row = tests[-1]
    if row.get("epoch", 0) < config.train.epochs:
        raise UserError(
            f"{folder}: finished at epoch {row.get('epoch')} without keeping last.pt "
            f"(train.keep_last: false), so it cannot train on to {config.train.epochs} "
            f"epochs; start it over with --force, or keep train.epochs={row.get('epoch')}"
        )
    return row


def resume_advice(folder: Path, forced: bool) -> str:
    """What continues an interrupted run: ``--resume`` (in place of ``--force``, which would
    start it over), from ``last.pt`` when there is one."""
    flag = "--resume in place of --force" if forced else "--resume"
    last = folder / "last.pt"
    if last.exists():
        return f"{folder}: rerun the same command with {flag}; it continues from {last.name}"
    return (
        f"{folder}: no checkpoint was written yet; rerun the same command with {flag} (it "
        "starts from the first step)"
    )


def entry() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
