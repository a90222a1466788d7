"""What a run read is recorded by sha256 and never lost: resolved paths, a finished run
trained longer, env.json over resumes, and xd-eval's scores per checkpoint."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import demo_args

from xdtrain.errors import UserError
from xdtrain.evaluate import main as eval_main
from xdtrain.provenance import encoder_changed
from xdtrain.report import main as report_main
from xdtrain.runlog import read_metrics
from xdtrain.shards.tar import file_sha256
from xdtrain.train import main


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


def env(run: Path) -> dict:
    return json.loads((run / "env.json").read_text())


def report(root: Path, out: Path, capsys) -> tuple[list[dict], str]:
    assert report_main([str(root), "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh)), (out / "results.md").read_text()


def test_runs_started_with_relative_paths_are_found_from_anywhere(
    packed, tmp_path, monkeypatch, capsys
):
    """Shards and encoder named relative to the project: config.yaml stores them resolved,
    so xd-eval and xd-report work from another directory (they used to tell the user to
    repack existing shards and label the pretraining "encoder")."""
    project = tmp_path / "project"
    (project / "shards").mkdir(parents=True)
    for name in ("imagenet", "lits"):
        shutil.copytree(packed[name], project / "shards" / name)
    monkeypatch.chdir(project)
    runs = Path("checkpoints")
    pre = runs / "pre"
    small = ["data.batch_size=4", "train.epochs=1"]
    assert main(demo_args("pt_simclr_imagenet.yaml", Path("shards/imagenet"), pre, *small)) == 0
    encoder = ["model.encoder_weights=checkpoints/pre/encoder.pt"]
    assert main(demo_args("ft_lits.yaml", Path("shards/lits"), runs / "ft", *small, *encoder)) == 0
    saved = (runs / "ft" / "config.yaml").read_text()
    assert f"shards: {project / 'shards' / 'lits'}" in saved
    assert f"encoder_weights: {project / 'checkpoints' / 'pre' / 'encoder.pt'}" in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert eval_main([str(project / runs / "ft")]) == 0
    table, _ = report(project / runs, elsewhere / "report", capsys)
    assert [r["pretrain"] for r in table] == ["simclr-imagenet"]
    # the resume from the same directory with the same relative command is the same run
    monkeypatch.chdir(project)
    argv = demo_args("ft_lits.yaml", Path("shards/lits"), runs / "ft", *small, *encoder)
    assert main([*argv, "--resume"]) == 0  # finished: nothing to do


def test_a_finished_pretraining_trained_longer_keeps_the_encoder_others_read(
    packed, tmp_path, capsys, caplog
):
    runs = tmp_path / "runs"
    pre, ft = runs / "pre", runs / "ft"
    base = demo_args(
        "pt_simclr_imagenet.yaml", packed["imagenet"], pre, "data.batch_size=4", "train.epochs=1"
    )
    assert main(base) == 0
    read = file_sha256(pre / "encoder.pt")
    weights = f"model.encoder_weights={pre / 'encoder.pt'}"
    argv = demo_args("ft_lits.yaml", packed["lits"], ft, "data.batch_size=4", "train.epochs=1")
    assert main([*argv, "--set", weights]) == 0
    assert env(ft)["encoder"]["sha256"] == read
    assert eval_main([str(ft)]) == 0
    # the advice "add --resume to continue it", with more epochs
    assert main([*base, "--resume", "--set", "train.epochs=2"]) == 0
    kept = pre / "finished_epoch1"
    assert file_sha256(kept / "encoder.pt") == read != file_sha256(pre / "encoder.pt")
    assert "epochs: 1" in (kept / "config.yaml").read_text()
    assert [r["epoch"] for r in read_metrics(kept / "metrics.jsonl") if r["kind"] == "test"]
    # the finetuning's evaluation and report say so, and name the encoder it really read
    caplog.clear()
    assert eval_main([str(ft), "--force"]) == 0
    assert any("has changed since" in r.getMessage() for r in caplog.records)
    assert "finished_epoch1" in json.loads((ft / "eval_test.json").read_text())["encoder_changed"]
    # resuming the finetuning from its changed encoder is refused with a way that works
    ft_longer = [*argv, "--set", weights, "--resume", "--set", "train.epochs=2"]
    with pytest.raises(UserError, match="copy .*finished_epoch1/encoder.pt back to") as info:
        main(ft_longer)
    kept_copy, target = re.search(r"copy (\S+) back to (\S+);", str(info.value)).groups()
    longer = pre / "encoder.pt"
    saved = longer.read_bytes()
    shutil.copy(kept_copy, target)
    assert main(ft_longer) == 0
    longer.unlink()  # gone (being trained longer again): the copy is still named
    assert "is gone; the bytes it read are kept in" in encoder_changed(env(ft))
    longer.write_bytes(saved)  # the longer pretraining's encoder again
    table, markdown = report(runs, tmp_path / "report", capsys)
    (row,) = table
    assert row["pretrain"] == "simclr-imagenet" and row["runs"] == "1"
    assert "ft: the encoder it read" in markdown and "has changed since" in markdown
    # a new finetuning from the longer pretraining is another encoder: another row
    assert main([*argv, "--set", weights, "--run-dir", str(runs / "ft2")]) == 0
    table, markdown = report(runs, tmp_path / "report2", capsys)
    assert len(table) == 2 and "train.epochs" in markdown


def test_env_json_keeps_the_first_start_and_a_resume_refuses_changed_inputs(packed, tmp_path):
    shards = tmp_path / "lits"
    shutil.copytree(packed["lits"], shards)
    run = tmp_path / "run"
    base = demo_args("ft_lits.yaml", shards, run, "data.batch_size=4", "train.epochs=1")
    assert main(base) == 0
    first = env(run)
    assert first["shards"]["manifest_sha256"] == file_sha256(shards / "manifest.json")
    assert main([*base, "--resume", "--set", "train.epochs=2"]) == 0
    after = env(run)
    assert {k: v for k, v in after.items() if k != "resumes"} == first
    assert [r["resumed_at_step"] for r in after["resumes"]] == [rows(run, "train")[0]["step"]]
    # shards repacked with other content under the same path: resuming would mix them
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the shards this run started from changed since"):
        main([*base, "--resume", "--set", "train.epochs=3"])
    assert env(run) == after


def test_xd_eval_never_replaces_the_scores_of_another_checkpoint(packed, tmp_path):
    run = tmp_path / "run"
    base = demo_args("ft_lits.yaml", packed["lits"], run, "data.batch_size=4", "train.epochs=1")
    assert main(base) == 0
    assert eval_main([str(run)]) == 0
    final = (run / "eval_test.json").read_text()
    assert eval_main([str(run), "--checkpoint", "last"]) == 0
    assert (run / "eval_test.json").read_text() == final  # untouched
    last = json.loads((run / "eval_test_last.json").read_text())
    assert last["checkpoint_sha256"] == file_sha256(run / "last.pt")
    assert (run / "overlays_test_last.png").is_file() and (run / "overlays_test.png").is_file()
    assert eval_main([str(run)]) == 0  # the same checkpoint again: the same scores
    # final.pt replaced (another training): its old scores are kept unless --force
    shutil.copy(run / "last.pt", run / "final.pt")
    with pytest.raises(UserError, match="holds the scores of another checkpoint"):
        eval_main([str(run)])
    assert (run / "eval_test.json").read_text() == final
    assert eval_main([str(run), "--force"]) == 0
