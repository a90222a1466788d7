"""Experiment configs: YAML files read into typed, nested dataclasses.

A config file may extend others with ``_base_: path`` (or a list of paths, relative to the
file); later files and ``--set a.b=value`` overrides win. Every key must exist in the schema
below and every value must have its declared type: a misspelled or stale key fails before any
work, with one line naming the file it came from, its key path and the closest valid key.

Print or save a resolved config with ``python -m xdtrain.config CONFIG [--set k=v] [--save F]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from xdtrain.errors import UserError, run_cli
from xdtrain.fileio import atomic_write
from xdtrain.shards import PACKERS

BASE_KEY = "_base_"
# The data sets xd-shard packs: a packer added to xdtrain.shards.PACKERS is a choice here too.
DatasetName = Literal[tuple(PACKERS)]  # type: ignore[valid-type]


# --------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    """Where a run lives and what makes it repeatable."""

    name: str = ""  # run folder under output_dir; empty: the config file's name
    output_dir: str = "checkpoints"  # parent folder of run folders
    seed: int = 0  # seeds weights, data order and augmentation (rank r uses seed + r)
    debug: bool = False  # anomaly detection, loader in the main process, raise on bad data
    pretrain: str = ""  # label of the pretraining for xd-report; empty: from encoder_weights
    mlflow: bool = False  # also log to MLflow (pip install 'xdtrain[mlflow]')
    mlflow_uri: str = ""  # MLflow tracking store; empty: the file store <output_dir>/mlruns


@dataclass
class DataConfig:
    """Which shards to stream and how to turn them into batches."""

    dataset: DatasetName = "imagenet"  # shards to read
    shards: str = ""  # folder written by xd-shard; empty: shards/<dataset>
    backend: Literal["dali", "albumentations"] = "dali"  # albumentations: CPU segmentation
    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: GPU (mixed decoding) if CUDA
    augment: str = ""  # preset (docs/pipelines.md); empty: the task's default
    solarize: float = 0.0  # SimCLR: probability of solarizing a view (BYOL uses 0.2 on one view)
    image_size: int = 224  # side of the square crops the network sees
    channels: int = 3  # network input: 3 RGB, 4 BraTS; greyscale sources 1 or 3
    views: int = 2  # SimCLR views per sample
    batch_size: int = 128  # per GPU
    workers: int = 4  # decoding threads (DALI, at least 1) or DataLoader workers (0: none)
    fraction: float = 1.0  # share of training patients used (1.0, 0.5, 0.1, 0.01)


@dataclass
class ModelConfig:
    """The network: a name from the model registry and its options."""

    name: str = "resnet50"  # resnet18|34|50, unet_/simclr_resnet18|34|50, timm/<any timm model>
    num_classes: int | None = None  # None: taken from the task
    encoder_weights: str | None = None  # encoder.pt, a run checkpoint, a torchvision or timm file
    frozen_encoder: bool = False  # linear evaluation: frozen weights and norm statistics
    projection_dims: list[int] = field(default_factory=lambda: [2048, 128])  # head widths
    projection_sigmoid: bool = False  # the study's head ends in a sigmoid


@dataclass
class LossConfig:
    """Loss options; each task reads the ones that apply to it."""

    temperature: float = 0.5  # NT-Xent
    gather: bool = False  # NT-Xent negatives from all GPUs instead of the local batch
    class_weights: list[float] | None = None  # per output (BCE) or class (cross-entropy)
    dice_weight: float = 0.0  # segmentation: cross-entropy + dice_weight * Dice loss


@dataclass
class OptimConfig:
    """Optimiser and its hyperparameters."""

    name: Literal["lars", "adamw", "sgd"] = "adamw"  # LARS skips biases, norms; AdamW, SGD fused
    lr: float = 1e-3  # base learning rate (before scale_lr)
    weight_decay: float = 0.0  # on weights only, never biases or normalisation
    momentum: float = 0.9  # LARS and SGD
    scale_lr: bool = False  # multiply lr by global batch / 256
    trust_coefficient: float = 0.001  # LARS eta


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped every iteration."""

    name: Literal["cosine", "exponential", "constant"] = "cosine"  # after the warmup
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)
    gamma: float = 0.95  # exponential: factor per epoch
    min_lr: float = 0.0  # cosine: final learning rate as a share of the base rate


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 50  # may be raised when resuming
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16/fp16 on GPU, fp32 CPU
    channels_last: bool = True  # NHWC memory layout (faster on GPUs; the demo configs use NCHW)
    compile: bool = False  # torch.compile the model
    grad_clip: float | None = None  # clip the gradient norm to this value
    sync_bn: bool = False  # batch-norm statistics over all GPUs (SyncBatchNorm)
    limit_batches: int | None = None  # shortens every epoch to this many batches
    log_every: int = 50  # steps between train rows in metrics.jsonl
    checkpoint_minutes: float = 30.0  # last.pt at least this often
    checkpoint_epochs: int = 1  # last.pt after every N-th epoch too; 0: by the minutes only
    keep_last: bool = True  # keep last.pt of a finished run (to train it longer)
    save_best: bool = True  # best.pt: weights of the best validation epoch (not the test's)
    figures_every: int = 5  # validation figures in TensorBoard every N epochs, the last; 0: off
    max_nonfinite: int = 10  # non-finite losses in a row that stop the run
    deterministic: bool = False  # deterministic kernels: bit-identical reruns, slower


@dataclass
class MonitorConfig:
    """The kNN monitor: how well the encoder's embeddings classify a labelled split, during
    training (meant for SimCLR, whose own loss says little about what the features know)."""

    every: int = 0  # epochs between kNN evaluations (and the last epoch); 0: off
    dataset: DatasetName | None = None  # labelled shards to score on; null: data.dataset
    shards: str = ""  # their folder; empty: shards/<dataset>
    bank_split: Literal["train", "val", "test"] = "train"  # the labelled memory bank
    query_split: Literal["train", "val", "test"] = "val"  # the samples classified
    bank_samples: int = 2048  # fixed, seeded sample of the bank split (bounds the cost)
    query_samples: int = 1024  # fixed, seeded sample of the query split
    k: int = 20  # neighbours that vote (Wu et al. 2018)
    temperature: float = 0.07  # vote weight exp(cosine similarity / temperature)


@dataclass
class Config:
    """One experiment: a task (``simclr`` pretraining or a finetuning task) and its settings."""

    task: str = "simclr"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# --------------------------------------------------------------------------- value ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric key admits; checked with its type, before any data is read."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return (
            f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
            f"{')' if self.high_open else ']'}"
        )


AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
SHARE = Range(0, 1)
RANGES: dict[tuple[str, str], Range] = {
    ("data", "image_size"): Range(32),  # ResNet's total stride
    ("data", "channels"): Range(1, 4),
    ("data", "views"): Range(2),  # NT-Xent pairs views
    ("data", "batch_size"): AT_LEAST_1,
    ("data", "workers"): NON_NEGATIVE,
    ("data", "fraction"): Range(0, 1, low_open=True),
    ("data", "solarize"): SHARE,
    ("model", "num_classes"): AT_LEAST_1,
    ("loss", "temperature"): POSITIVE,
    ("loss", "dice_weight"): NON_NEGATIVE,
    ("optim", "lr"): POSITIVE,
    ("optim", "weight_decay"): NON_NEGATIVE,
    ("optim", "momentum"): Range(0, 1, high_open=True),
    ("optim", "trust_coefficient"): POSITIVE,
    ("schedule", "warmup_epochs"): NON_NEGATIVE,
    ("schedule", "gamma"): Range(0, 1, low_open=True),
    ("schedule", "min_lr"): SHARE,
    ("train", "epochs"): AT_LEAST_1,
    ("train", "grad_clip"): POSITIVE,
    ("train", "limit_batches"): AT_LEAST_1,
    ("train", "log_every"): AT_LEAST_1,
    ("train", "figures_every"): NON_NEGATIVE,
    ("train", "checkpoint_epochs"): NON_NEGATIVE,
    ("train", "checkpoint_minutes"): POSITIVE,
    ("train", "max_nonfinite"): AT_LEAST_1,
    ("monitor", "every"): NON_NEGATIVE,
    ("monitor", "bank_samples"): AT_LEAST_1,
    ("monitor", "query_samples"): AT_LEAST_1,
    ("monitor", "k"): AT_LEAST_1,
    ("monitor", "temperature"): POSITIVE,
}


# --------------------------------------------------------------------------- reading YAML

Origins = dict[tuple[str, ...], str]


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}:{where}: {problem}; fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _merge(dst: dict, src: dict, origins: Origins, source: str, prefix=()) -> None:
    """Deep-merge ``src`` into ``dst``, recording which file set every key."""
    for key, value in src.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            origins[path] = source
            _merge(dst[key], value, origins, source, path)
        else:
            dst[key] = _deep_copy(value)
            for old in [p for p in origins if p[: len(path)] == path]:
                del origins[old]
            _record(value, path, origins, source)


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _record(value, path, origins: Origins, source: str) -> None:
    origins[path] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(sub, (*path, str(key)), origins, source)


def _load_tree(path: Path, origins: Origins, chain: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` with its ``_base_`` files merged underneath it."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"{path}: {BASE_KEY} files include each other ({cycle})")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: {BASE_KEY} must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        base_tree = _load_tree(path.parent / base, origins, (*chain, resolved))
        _merge(merged, base_tree, origins, str(path.parent / base))
    _merge(merged, data, origins, str(path))
    return merged


# --------------------------------------------------------------------------- validation


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        suffix = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(names) + suffix
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if _is_dataclass_type(tp):
        return "a mapping"
    return {bool: "bool (true/false)", int: "int", float: "float", str: "str"}.get(tp, str(tp))


class _Mismatch(Exception):
    """A value does not have the expected type; carries the key path where it failed."""

    def __init__(self, path: tuple[str, ...], expected: str, value):
        super().__init__(path)
        self.path, self.expected, self.value = path, expected, value


def _describe(value) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


def _coerce(tp, value, path: tuple[str, ...], origins: Origins):
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise _Mismatch(path, "a mapping", value)
        return _build(tp, value, path, origins)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path, origins)
            except _Mismatch as exc:
                if exc.path != path:  # failed deeper inside a matching container
                    raise
        raise _Mismatch(path, _type_name(tp), value)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch(path, _type_name(tp), value)
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(path, _type_name(tp), value)
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, (*path, str(i)), origins) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema field with a type this module does not know
        raise TypeError(f"unsupported config type {tp!r} at {'.'.join(path)}")
    raise _Mismatch(path, _type_name(tp), value)


def _as_float(value) -> float | None:
    """A finite number; also a string like ``1e-3``, which YAML 1.1 does not read as a float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _schema_paths(cls, prefix=()) -> list[tuple[str, ...]]:
    """Every key path of the schema, sections and leaves."""
    out = []
    for name, tp in _hints(cls).items():
        path = (*prefix, name)
        out.append(path)
        if _is_dataclass_type(tp):
            out.extend(_schema_paths(tp, path))
    return out


def _suggest(key: str, section_keys: list[str], prefix: tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(key, section_keys, n=1, cutoff=0.6)
    if close:
        return ".".join((*prefix, close[0]))
    # The key may belong in another section (``train.lr`` for ``optim.lr``).
    elsewhere = [p for p in _schema_paths(Config) if p[-1] == key]
    if elsewhere:
        return ".".join(elsewhere[0])
    every = {".".join(p): p for p in _schema_paths(Config)}
    close = difflib.get_close_matches(".".join((*prefix, key)), list(every), n=1, cutoff=0.75)
    return close[0] if close else None


def _source(path: tuple[str, ...], origins: Origins) -> str:
    for cut in range(len(path), 0, -1):
        if path[:cut] in origins:
            return origins[path[:cut]]
    return "<config>"


def _build(cls, data: dict, prefix: tuple[str, ...], origins: Origins):
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            path = (*prefix, str(key))
            hint = _suggest(str(key), list(hints), prefix)
            tail = f"did you mean '{hint}'?" if hint else "valid keys: " + ", ".join(hints)
            raise UserError(f"{_source(path, origins)}: unknown key '{'.'.join(path)}' ({tail})")
    kwargs = {}
    for name, tp in hints.items():
        if name in data:
            path = (*prefix, name)
            value = kwargs[name] = _coerce(tp, data[name], path, origins)
            limits = RANGES.get(path)
            if limits is not None and value is not None and not limits.admits(value):
                expected = f"{_type_name(tp).removesuffix(' or null')} {limits}"
                raise _Mismatch(path, expected, data[name])  # the value as written
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<config>", origins: Origins | None = None):
    """Validate a plain dict (a parsed YAML tree) into a :class:`Config`."""
    origins = dict(origins or {})
    if not origins:
        _record(data, (), origins, source)
    try:
        return _build(Config, data, (), origins)
    except _Mismatch as exc:
        where = _source(exc.path, origins)
        key = ".".join(exc.path)
        raise UserError(
            f"{where}: {key}: expected {exc.expected}, got {_describe(exc.value)}"
        ) from None


# --------------------------------------------------------------------------- overrides


def _field_type(path: tuple[str, ...], text: str):
    cls: Any = Config
    for depth, key in enumerate(path):
        hints = _hints(cls) if _is_dataclass_type(cls) else {}
        if key not in hints:
            hint = _suggest(key, list(hints), path[:depth])
            tail = f"did you mean '{hint}'?" if hint else "valid keys: " + ", ".join(hints)
            raise UserError(f"--set {text}: unknown key '{'.'.join(path)}' ({tail})")
        cls = hints[key]
    return cls


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set optim.lr=0.01")
    path = tuple(part.strip() for part in key.strip().split("."))
    tp = _field_type(path, text)
    nullable = typing.get_origin(tp) in (Union, types.UnionType)
    plain = [a for a in typing.get_args(tp) if a is not type(None)] if nullable else [tp]
    if plain == [str] and not (nullable and raw.strip().lower() in ("null", "none", "~")):
        return path, raw  # a string field takes the text as typed, e.g. run.name=0042
    try:
        return path, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return path, raw


def apply_overrides(tree: dict, overrides: list[str], origins: Origins) -> None:
    """Apply ``a.b=value`` overrides to a parsed tree, typed by the schema."""
    for text in overrides:
        path, value = _parse_override(text)
        node = tree
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
        _record(value, path, origins, f"--set {text}")


# --------------------------------------------------------------------------- public API


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a config file (with its bases) and overrides into a validated :class:`Config`."""
    origins: Origins = {}
    tree = _load_tree(Path(path), origins)
    apply_overrides(tree, list(overrides), origins)
    return config_from_dict(tree, str(path), origins)


def run_folder(config: Config, config_path: str | Path, run_dir: str | None) -> Path:
    """The run folder ``xd-train`` writes: ``--run-dir``, else ``run.output_dir/run.name``
    (the config file's name when ``run.name`` is empty); relative to the working folder."""
    if run_dir:
        return Path(run_dir)
    return Path(config.run.output_dir) / (config.run.name or Path(config_path).stem)


def seed_runs(
    config: Config, config_path: str | Path, run_dir: str | None, seeds: list[int] | None
) -> list[tuple[Config, Path]]:
    """``[(config, run folder)]`` of ``xd-train --seeds``: one run per seed, with
    ``run.seed`` set and the folder's name suffixed ``_s<seed>`` (``run.name`` too, when
    the folder comes from it); without seeds, the one run :func:`run_folder` names. Raises
    UserError for a seed given twice."""
    base = run_folder(config, config_path, run_dir)
    if not seeds:
        return [(config, base)]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: each seed once")
    out = []
    for seed in seeds:
        name = config.run.name if run_dir else f"{base.name}_s{seed}"
        run = dataclasses.replace(config.run, seed=seed, name=name)
        out.append((dataclasses.replace(config, run=run), base.with_name(f"{base.name}_s{seed}")))
    return out


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, every key spelled out."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config atomically; :func:`load_config` reads it back unchanged."""
    return atomic_write(path, dump_config(cfg))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``CONFIG`` and ``--set KEY=VALUE`` arguments every config-reading command takes."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set optim.lr=0.01 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xdtrain.config",
        description="Print (and optionally save) a fully resolved xdtrain config.",
    )
    add_config_arguments(parser)
    parser.add_argument("--save", metavar="FILE", help="also write the resolved config here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    sys.stdout.write(dump_config(cfg))
    if args.save:
        save_config(cfg, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
