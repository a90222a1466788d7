"""``xd-analyze`` on a tiny grid (a SimCLR run; LiTS from scratch and from its encoder, two
seeds each): what it finds, its numbers against a recomputation from the stored features,
its figures, the link from ``xd-report``, reuse on a rerun, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ROOT

from xdtrain.analysis.cli import main as analyze_main
from xdtrain.analysis.features import Features
from xdtrain.errors import UserError
from xdtrain.report import main as report_main


def centred_gram(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ x.astype(np.float64).T


def unbiased_hsic(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out."""
    n = len(k)
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    one = np.ones(n)
    value = np.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
    value -= 2 / (n - 2) * (one @ k @ m @ one)
    return value / (n * (n - 3))


def cka(x: np.ndarray, y: np.ndarray) -> float:
    k, m = centred_gram(x), centred_gram(y)
    return unbiased_hsic(k, m) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(m, m))


def test_grid_analysis_finds_the_pairs_and_its_numbers_follow_from_the_features(
    grid_runs, tmp_path, capsys
):
    out = tmp_path / "report" / "analysis"
    argv = [str(grid_runs), "--out", str(out), "--samples", "12", "--train-samples", "24",
            "--map", "pca"]  # fmt: skip
    assert analyze_main(["grid", *argv]) == 0
    result = json.loads((out / "analysis.json").read_text())
    lits = result["tasks"]["lits"]
    pairs = {p["pair"]: p for p in lits["pairs"]}
    kept = "simclr-imagenet → finetuned (full, 100%)"
    versus = "scratch-finetuned vs simclr-imagenet-finetuned (full, 100%)"
    assert set(pairs) == {kept, versus}
    assert pairs[kept]["seeds"] == pairs[versus]["seeds"] == 2
    # the seed-0 pair from the stored features, with CKA written out from its formula
    pre, run = pairs[kept]["runs"][0]
    assert pre == "simclr-imagenet" and run.endswith("pre0")
    stored = {}
    for name, folder in (("pre", grid_runs / "pt"), ("fine", grid_runs / "pre0")):
        (path,) = [p for p in (folder / "features").glob("lits*_test_12_*.npz")]
        stored[name] = Features.load(path)
    assert np.array_equal(stored["pre"].keys, stored["fine"].keys)
    matrix = np.array(pairs[kept]["per_seed"][0], dtype=float)
    for i, a in enumerate(stored["pre"].stages.values()):
        for j, b in enumerate(stored["fine"].stages.values()):
            assert matrix[i, j] == pytest.approx(cka(a, b), abs=1e-5)
    mean = np.mean([np.array(m, dtype=float) for m in pairs[kept]["per_seed"]], axis=0)
    np.testing.assert_allclose(np.array(pairs[kept]["matrix"]), mean, atol=1e-12)
    # probes of the frozen encoders: the pretrained one and an untrained baseline
    probes = lits["probes"]
    assert set(probes) == {"simclr-imagenet", "random-init resnet18"}
    for scores in probes.values():
        assert list(scores["stages"]) == ["stem", "layer1", "layer2", "layer3", "layer4"]
        assert scores["test_samples"] == 12 and scores["label_kind"] == "presence"
    # the domain map: both data sets of the grid through the SimCLR encoder
    (mapped,) = result["maps"].values()
    assert sorted(mapped["datasets"]) == ["imagenet", "lits"]
    assert 0.0 <= mapped["separation"] <= 1.0
    # every figure the index shows exists and is a PNG
    index = (out / "index.md").read_text()
    images = [line for line in index.splitlines() if line.startswith("![")]
    shown = [line[line.rindex("](") + 2 : -1] for line in images]
    assert len(shown) >= 6
    for name in shown:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert any("same_stage" in n for n in shown) and any(n.startswith("map_") for n in shown)
    # xd-report links it
    assert report_main([str(grid_runs), "--out", str(out.parent)]) == 0
    text = (out.parent / "results.md").read_text()
    assert "## Feature-space analysis" in text and "(analysis/index.md)" in text
    assert "(analysis/map_simclr-imagenet.png)" in text
    # a rerun reuses every stored features file
    files = sorted(grid_runs.rglob("features/*.npz")) + sorted(out.rglob("features/*.npz"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert analyze_main(["grid", *argv]) == 0
    assert [p.stat().st_mtime_ns for p in files] == stamps
    capsys.readouterr()


def test_analyze_commands_on_encoders_and_configs(grid_runs, tmp_path, capsys):
    data = ["--data", str(grid_runs / "scratch0"), "--samples", "10"]
    encoders = [str(grid_runs / "scratch0"), str(grid_runs / "pre0"), "random:resnet18"]
    assert analyze_main(["cka", *encoders, *data, "--out", str(tmp_path / "cka")]) == 0
    result = json.loads((tmp_path / "cka" / "cka.json").read_text())
    assert len(result["pairs"]) == 3
    assert (tmp_path / "cka" / "cka_same_stage.png").is_file()
    assert (tmp_path / "cka" / "features").is_dir()  # the untrained encoder's features
    config = str(ROOT / "configs" / "demo" / "ft_lits.yaml")
    probe = ["--data", config, "--set", f"data.shards={grid_runs / 'scratch0'}"]
    with pytest.raises(UserError, match="manifest"):
        analyze_main(["probe", str(grid_runs / "pt"), *probe, "--out", str(tmp_path / "p")])
    with pytest.raises(UserError, match="no such run folder"):
        analyze_main(["features", str(tmp_path / "nothing"), *data])
    with pytest.raises(UserError, match="at least two"):
        analyze_main(["cka", str(grid_runs / "pt"), *data, "--out", str(tmp_path / "c")])
    # two untrained encoders keep their own features (one folder holds both)
    pair = ["random:resnet18", "random:resnet34", *data, "--out", str(tmp_path / "rand")]
    assert analyze_main(["cka", *pair]) == 0
    same_stage = json.loads((tmp_path / "rand" / "cka.json").read_text())["pairs"][0]
    assert min(same_stage["same_stage"]) < 0.99
    assert len(list((tmp_path / "rand" / "features").glob("*.npz"))) == 2
    # arguments that cannot give a number fail in one line
    for bad, text in (
        (["--samples", "3"], "at least 4"),
        (["--cka-batch", "2"], "--cka-batch"),
        (["--k", "0"], "--k"),
        (["--temperature", "0"], "--temperature"),
    ):
        with pytest.raises(UserError, match=text):
            command = "cka" if bad[0] in ("--samples", "--cka-batch") else "probe"
            analyze_main([command, *encoders[:2], *data, *bad, "--out", str(tmp_path / "x")])
    leak = [str(grid_runs / "pt"), *data, "--split", "train", "--out", str(tmp_path / "leak")]
    with pytest.raises(UserError, match="in the training sample too"):
        analyze_main(["probe", *leak])
    capsys.readouterr()


def test_a_finetuned_run_is_compared_with_the_encoder_it_started_from(grid_runs, tmp_path):
    """The SimCLR run trained on after the finetuning read its encoder.pt: the pair uses the
    copy kept in finished_epoch<N>/ (the bytes the run read), never the newer file."""
    import shutil

    import torch

    from xdtrain.analysis.grid import find

    root = tmp_path / "grid"
    shutil.copytree(grid_runs / "pt", root / "pt", ignore=shutil.ignore_patterns("features"))
    shutil.copytree(grid_runs / "pre0", root / "pre0", ignore=shutil.ignore_patterns("features"))
    kept = root / "pt" / "finished_epoch1"
    kept.mkdir()
    for name in ("encoder.pt", "config.yaml"):  # as xd-train's keep_finished leaves them
        shutil.copy(root / "pt" / name, kept / name)
    newer = torch.load(root / "pt" / "encoder.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in newer.items()},
               root / "pt" / "encoder.pt")  # fmt: skip
    env = json.loads((root / "pre0" / "env.json").read_text())
    env["encoder"]["path"] = str(root / "pt" / "encoder.pt")
    (root / "pre0" / "env.json").write_text(json.dumps(env))
    grid = find(root)
    (run,) = grid.tasks["lits"].runs
    assert run.start == "simclr-imagenet (finished_epoch1)"
    assert grid.starts[run.start].weights == kept / "encoder.pt"
    (kept / "encoder.pt").unlink()
    grid = find(root)
    assert grid.tasks["lits"].runs[0].start is None
    assert any("no copy is kept" in note for note in grid.skipped)
