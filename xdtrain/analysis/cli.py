"""``xd-analyze``: look inside encoders (a thin CLI over :mod:`xdtrain.analysis`).

    xd-analyze features ENCODER... --data CONFIG [--split test] [--samples N]
    xd-analyze cka ENCODER ENCODER... --data CONFIG --out DIR
    xd-analyze probe ENCODER... --data CONFIG --out DIR
    xd-analyze map ENCODER --data CONFIG --data CONFIG... --out DIR
    xd-analyze grid RUNS_DIR --out DIR

An ENCODER is a run folder (its ``encoder.pt``), a weights file or ``random:resnet18``;
``--data`` is a config file (its ``data`` section, ``--set`` applies) or a run folder (the
data it trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from xdtrain.errors import UserError, run_cli


def load_data(spec: str, overrides: list[str]):
    """The ``data`` section of a config file or of a run folder's ``config.yaml``, with its
    shard folder made absolute."""
    from xdtrain.config import load_config
    from xdtrain.data import shard_folder

    path = Path(spec)
    if path.is_dir():
        path = path / "config.yaml"
        if not path.is_file():
            raise UserError(f"{spec}: no config.yaml; pass a config file or a run folder")
    data = load_config(path, overrides).data
    return dataclasses.replace(data, shards=str(shard_folder(data).expanduser().resolve()))


def _encoders(specs: list[str], seed: int):
    from xdtrain.analysis.features import encoder_source

    encoders = [encoder_source(s, seed) for s in specs]
    labels = [e.label for e in encoders]
    for i, label in enumerate(labels):  # two files of one folder: name them apart
        if labels.count(label) > 1:
            encoders[i] = dataclasses.replace(encoders[i], label=specs[i])
    return encoders


def _features(args, encoders, data=None, split=None, samples=None):
    from xdtrain.analysis.features import Features, extract

    data = data or load_data(args.data[0], args.set)
    out = Path(args.out) if getattr(args, "out", None) else Path.cwd()
    paths = extract(
        encoders,
        data,
        split or args.split,
        samples=args.samples if samples is None else samples,
        seed=args.seed,
        out=out,
    )
    loaded = []
    for enc, path in zip(encoders, paths, strict=True):
        features = Features.load(path)
        features.meta["encoder"] = enc.label
        loaded.append(features)
    return paths, loaded


def cmd_features(args) -> int:
    paths, loaded = _features(args, _encoders(args.encoders, args.seed))
    for path, features in zip(paths, loaded, strict=True):
        widths = ", ".join(f"{k} {v.shape[1]}" for k, v in features.stages.items())
        print(f"wrote {path} ({len(features.keys)} samples; {widths})")
    return 0


def cmd_cka(args) -> int:
    import numpy as np

    from xdtrain.analysis import figures, measures

    encoders = _encoders(args.encoders, args.seed)
    if len(encoders) < 2:
        raise UserError("cka: pass at least two encoders")
    _, loaded = _features(args, encoders)
    out = Path(args.out)
    results, diagonals = [], {}
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            a, b = loaded[i], loaded[j]
            result = measures.similarity(a, b, args.cka_batch or None)
            name = f"{result['a']} vs {result['b']}"
            path = figures.cka_heatmap(
                np.array(result["matrix"], dtype=float), result["stages_a"], result["stages_b"],
                result["a"], result["b"], out / f"cka_{i}_{j}.png", samples=result["samples"],
            )  # fmt: skip
            result["figure"] = path.name
            results.append(result)
            if result["stages_a"] == result["stages_b"] == list(loaded[0].stages):
                diagonals[name] = result["same_stage"]  # encoders of the first's architecture
            same = " ".join(f"{v:.3f}" for v in result["same_stage"]) or "none (no common stage)"
            print(f"{name}: same-stage CKA {same}")
    if diagonals:
        figures.cka_diagonals(
            diagonals, list(loaded[0].stages), out / "cka_same_stage.png",
            title="same-stage linear CKA",
        )  # fmt: skip
    _write_json(out / "cka.json", {"pairs": results})
    print(f"wrote {out}/cka.json and figures")
    return 0


def cmd_probe(args) -> int:
    from xdtrain.analysis import figures, measures

    encoders = _encoders(args.encoders, args.seed)
    data = load_data(args.data[0], args.set)
    _, test = _features(args, encoders, data)
    _, train = _features(args, encoders, data, split="train", samples=args.train_samples)
    out = Path(args.out)
    results = {
        enc.label: measures.probes(tr, te, args.k, args.temperature, args.seed)
        for enc, tr, te in zip(encoders, train, test, strict=True)
    }
    first = next(iter(results.values()))
    stages = list(first["stages"])
    for metric in first["stages"][stages[-1]]:
        if metric not in figures.METRIC_NAMES:
            continue
        figures.probe_curves(
            measures.probe_series(results, metric), stages, metric, out / f"probe_{metric}.png",
            title=f"{figures.METRIC_NAMES[metric]} per stage", chance=first["chance"].get(metric),
        )  # fmt: skip
    for label, result in results.items():
        last = result["stages"][stages[-1]]
        print(f"{label}: {stages[-1]} " + ", ".join(f"{k} {_fmt(v)}" for k, v in last.items()))
    _write_json(out / "probe.json", results)
    print(f"wrote {out}/probe.json and figures")
    return 0


def cmd_map(args) -> int:
    from xdtrain.analysis import figures, measures

    (encoder,) = _encoders([args.encoder], args.seed)
    feats = {}
    for spec in args.data:
        data = load_data(spec, args.set)
        _, (features,) = _features(args, [encoder], data)
        feats[Path(data.shards).name] = features
    mapped = measures.domain_map(feats, method=args.map, seed=args.seed)
    out = Path(args.out)
    path = figures.domain_map(
        mapped["coords"], mapped["groups"], out / f"map_{args.map}.png",
        title=f"{', '.join(feats)} through {encoder.label} ({mapped['stage']})",
        method=args.map, separation=mapped["separation"],
    )  # fmt: skip
    _write_json(
        out / "map.json",
        {"encoder": encoder.label, "separation": mapped["separation"], "datasets": list(feats)},
    )
    print(f"kNN group purity in the map: {mapped['separation']:.3f}; wrote {path}")
    return 0


def cmd_grid(args) -> int:
    from xdtrain.analysis import grid

    options = grid.Options(
        split=args.split,
        samples=args.samples,
        train_samples=args.train_samples,
        seed=args.seed,
        cka_batch=args.cka_batch or None,
        k=args.k,
        temperature=args.temperature,
        method=args.map,
    )
    out = Path(args.out)
    grid.analyse(Path(args.runs), out, options, say=lambda text: print(text, file=sys.stderr))
    print(f"wrote {out / grid.INDEX} and {out / grid.RESULTS}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _write_json(path: Path, data) -> None:
    from xdtrain.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def parser() -> argparse.ArgumentParser:
    from xdtrain.analysis.maps import METHODS

    top = argparse.ArgumentParser(
        prog="xd-analyze",
        description="Look inside encoders: per-stage features, CKA, probes, domain maps.",
    )
    sub = top.add_subparsers(dest="command", required=True)

    def common(p, samples: int, data: bool = True):
        if data:
            p.add_argument(
                "--data", action="append", required=True,
                help="config file or run folder whose data section is read (repeat for map)",
            )  # fmt: skip
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--split", default="test", choices=["train", "val", "test"])
        p.add_argument(
            "--samples", type=int, default=samples,
            help=f"fixed, seeded sample of the split (default {samples})",
        )  # fmt: skip
        p.add_argument("--seed", type=int, default=0, help="sample seed (and untrained weights)")

    p = sub.add_parser("features", help="per-stage embeddings, stored beside each encoder")
    p.add_argument("encoders", nargs="+", help="run folder, weights file or random:resnet18")
    common(p, 1000)
    p.add_argument("--out", help="folder for encoders without one (random:…); default: here")
    p.set_defaults(run=cmd_features)

    p = sub.add_parser("cka", help="linear CKA between every pair of encoders")
    p.add_argument("encoders", nargs="+")
    common(p, 1000)
    p.add_argument("--cka-batch", type=int, default=0, help="minibatch CKA size (0: one batch)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_cka)

    p = sub.add_parser("probe", help="kNN and linear probes per stage of frozen encoders")
    p.add_argument("encoders", nargs="+")
    common(p, 1000)
    p.add_argument("--train-samples", type=int, default=2000, help="bank / probe training set")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_probe)

    p = sub.add_parser("map", help="2-D map of several data sets through one encoder")
    p.add_argument("encoder")
    common(p, 500)
    p.add_argument("--map", choices=METHODS, default="tsne")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_map)

    p = sub.add_parser("grid", help="all of the above for the runs of an experiment grid")
    p.add_argument("runs", help="folder holding the grid's run folders")
    common(p, 512, data=False)
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--cka-batch", type=int, default=0)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--map", choices=METHODS, default="tsne")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_grid)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name, least in (("samples", 1), ("train_samples", 1), ("k", 1)):
        if getattr(args, name, least) < least:
            raise UserError(f"--{name.replace('_', '-')}: at least {least}")
    if getattr(args, "temperature", 1.0) <= 0:
        raise UserError("--temperature: must be above 0")
    if 0 < getattr(args, "cka_batch", 0) < 4 or getattr(args, "cka_batch", 0) < 0:
        raise UserError("--cka-batch: 0 (one batch of every sample) or at least 4")
    if getattr(args, "out", None):
        Path(args.out).mkdir(parents=True, exist_ok=True)
    return args.run(args)


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
