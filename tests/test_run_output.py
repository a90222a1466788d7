"""What a run shows and leaves: job-log lines without a terminal, every metric on screen,
TensorBoard figures and hparams, MLflow, best.pt, the demo's checkpoint budget and the
warning for a GPU config on a CPU machine."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import sys

import numpy as np
import pytest
import torch
from helpers import demo_args

from xdtrain import display, memcheck, tasks
from xdtrain.config import load_config
from xdtrain.errors import UserError
from xdtrain.metrics import MultiLabelAUROC
from xdtrain.progress import LineProgress, clock
from xdtrain.runlog import read_metrics
from xdtrain.train import main

TRAIN_LINE = re.compile(
    r"^\d\d:\d\d:\d\d epoch (\d+)/(\d+) step (\d+)/(\d+) \(run (\d+)/(\d+)\) loss [\d.]+ "
    r"lr [\d.e+-]+ [\d.]+ samples/s data wait \d+ % ETA \d+:\d\d:\d\d$"
)


def test_line_progress_writes_every_n_items_and_at_the_end_only_for_line_tasks():
    out = io.StringIO()
    progress = LineProgress(every=3, stream=out)
    quiet = progress.add_task("epoch 1/2", total=7)
    shown = progress.add_task("val epoch 1/2", total=7, lines=True)
    for _ in range(7):
        progress.update(quiet, advance=1, loss=1.0, lr=0.1)
        progress.update(shown, advance=1)
    lines = out.getvalue().splitlines()
    done = [
        re.search(r"val epoch 1/2: (\d+)/7 batches, [\d.]+ batches/s, elapsed", x) for x in lines
    ]
    assert [int(m.group(1)) for m in done] == [3, 6, 7]  # every 3rd and the last
    assert clock(3725.4) == "1:02:05" and clock(None) == "?"


def test_every_metric_is_shown_grouped_with_names_holding_a_slash():
    row = {
        "kind": "val", "epoch": 2, "step": 9, "loss": 0.5, "cases": 3,
        "dice_NCR/NET": 0.0, "iou_NCR/NET": 0.0, "dice_NCR/NET_all_pixels": 0.25,
        "dice_ET": 0.5, "dice_WT": 0.9, "iou_WT": 0.8,
    }  # fmt: skip
    names = ["NCR/NET", "ED", "ET", "WT", "TC"]
    assert display.split_key("dice_NCR/NET_all_pixels", names) == ("NCR/NET", "dice_all_pixels")
    assert display.split_key("dice_ET", names) == ("ET", "dice")
    assert display.split_key("auroc_mean", ["Mass"]) is None
    scalars, per_name = display.group(row, names)
    assert scalars == {"loss": 0.5, "cases": 3}
    assert per_name["NCR/NET"] == {"dice": 0.0, "iou": 0.0, "dice_all_pixels": 0.25}
    assert list(per_name) == ["NCR/NET", "ET", "WT"]  # the task's order; ED/TC not in the row
    lines = display.lines(row, names, "val: ")
    assert lines[0] == "val: loss 0.5000, cases 3"
    assert lines[1] == "  NCR/NET: dice 0.0000, iou 0.0000, dice_all_pixels 0.2500"
    # every number of the row is on screen, in one of the tables
    shown = "\n".join(lines)
    for key, value in row.items():
        if key not in display.NOT_METRICS:
            assert f"{value:.4f}" in shown or str(value) in shown, key
    assert display.names_in(row) == ["NCR/NET", "WT"]  # those with Dice and IoU


def test_the_classes_a_mean_auroc_left_out_are_named_with_the_reason():
    metric = MultiLabelAUROC(["Mass", "Hernia", "No Finding"], findings=2)
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.4, 0.6], [0.7, 0.2, 0.1]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 1]])  # Hernia: no positive
    metric.update(scores, targets)
    result = metric.compute()
    assert result["left_out"] == ["Hernia (one label only)", "No Finding (not a finding)"]
    assert result["classes_averaged"] == 1 and result["mean"] == result["auroc"]["Mass"]
    row = {"auroc_mean": result["mean"], "auroc_left_out": result["left_out"]}
    assert "  left out of auroc_mean: Hernia (one label only), No Finding (not a finding)" in (
        display.lines(row, [], "test: ")
    )


class _BestFirst:
    """Metrics whose primary score is highest at the first validation."""

    def __init__(self, metrics, bonus: float):
        self.metrics, self.bonus = metrics, bonus
        self.names = metrics.names

    def update(self, outputs, batch) -> None:
        self.metrics.update(outputs, batch)

    def compute(self) -> dict:
        result = self.metrics.compute()
        self.details = getattr(self.metrics, "details", None)
        return result | {"dice_WT": result["dice_WT"] + self.bonus}


def test_a_run_without_a_terminal_logs_lines_figures_hparams_mlflow_and_best(
    packed, tmp_path, monkeypatch, capsys
):
    task = tasks.TASKS["brats"]
    bonus = iter([5.0, 0.0])  # epoch 1's validation is the best; epoch 2's and the test not
    shifted = dataclasses.replace(
        task, metrics=lambda c, cfg: _BestFirst(task.metrics(c, cfg), next(bonus, 0.0))
    )
    monkeypatch.setitem(tasks.TASKS, "brats", shifted)
    run, store = tmp_path / "run", tmp_path / "store"
    extra = (
        "data.batch_size=4", "train.epochs=2", "train.limit_batches=2", "train.log_every=1",
        "train.figures_every=1", "train.save_best=true", "run.mlflow=true",
        f"run.output_dir={store}",
    )  # fmt: skip
    assert main(demo_args("ft_brats.yaml", packed["brats"], run, *extra)) == 0
    out, err = capsys.readouterr()
    train_lines = [m for m in map(TRAIN_LINE.match, err.splitlines()) if m]
    assert [(int(m[1]), int(m[3]), int(m[5])) for m in train_lines] == [
        (1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4),
    ]  # fmt: skip
    assert re.search(r"val epoch 2/2: \d+/\d+ batches", err) and re.search(r" test: \d+/", err)
    assert "NCR/NET: dice" in err and "val epoch 1/2: loss" in err
    test_lines = out.split("test: ", 1)[1].splitlines()
    assert [x.split(":")[0].strip() for x in test_lines[1:]] == ["NCR/NET", "ED", "ET", "WT", "TC"]
    test = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "test"][0]
    assert test["checkpoint"] == "final.pt" and test["best_val_epoch"] == 1
    # best.pt: the first epoch's weights, labelled; final.pt: the second's, the test score's
    best = torch.load(run / "best.pt", weights_only=True)
    final = torch.load(run / "final.pt", weights_only=True)
    assert best["epoch"] == 1 and final["epoch"] == 2
    assert "never the model of the reported test score" in best["role"]
    assert any(not torch.equal(v, final["model"][k]) for k, v in best["model"].items())
    # TensorBoard: validation figures at each epoch's step, hparams with the test scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"val/overlays", "val/dice"}
    assert [e.step for e in events.Images("val/overlays")] == [2, 4]
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"test/dice_WT", "test/dice_NCR/NET", "test/loss"} <= tags
    assert all(t in events.Tags()["scalars"] for t in tags)  # each shown with its value
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.epochs"].number_value == 2
    # MLflow: the same numbers, parameters and figures, in the file store
    from mlflow import MlflowClient

    record = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    mlrun = client.get_run(record["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["train.epochs"] == "2"
    assert mlrun.data.metrics["test/dice_WT"] == pytest.approx(test["dice_WT"])
    history = client.get_metric_history(record["run_id"], "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    figures = [a.path for a in client.list_artifacts(record["run_id"], "figures/step_4")]
    assert sorted(figures) == ["figures/step_4/dice_val.png", "figures/step_4/overlays_val.png"]


def test_the_demo_budget_keeps_final_and_encoder_of_each_seed_then_a_rerun_does_nothing(
    packed, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = demo_args(
        "ft_imagenet.yaml", packed["imagenet"], run, "data.batch_size=8", "train.epochs=2",
        "train.limit_batches=1", "train.keep_last=false", "train.checkpoint_epochs=0",
    )  # fmt: skip
    argv += ["--seeds", "3", "5"]
    assert main(argv) == 0
    runs = [tmp_path / "run_s3", tmp_path / "run_s5"]
    out, _ = capsys.readouterr()
    assert [x for x in out.splitlines() if x.startswith("run: ")] == [f"run: {r}" for r in runs]
    seeds = [load_config(r / "config.yaml").run.seed for r in runs]
    assert seeds == [3, 5] and not run.exists()
    tests = [[x for x in read_metrics(r / "metrics.jsonl") if x["kind"] == "test"] for r in runs]
    assert tests[0][0]["loss"] != tests[1][0]["loss"]  # two seeds, two models
    for r in runs:
        assert sorted(p.name for p in r.glob("*.pt")) == ["encoder.pt", "final.pt"]
    before = [(r / "metrics.jsonl").read_bytes() for r in runs]
    assert main([*argv, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert err.count("finished already; nothing to do") == 2
    assert out.startswith(f"run: {runs[0]}\ntest: loss")
    assert [(r / "metrics.jsonl").read_bytes() for r in runs] == before
    with pytest.raises(UserError, match="without keeping last.pt .* --force"):
        main([*argv, "--resume", "--set", "train.epochs=3"])
    with pytest.raises(UserError, match="--seeds 1 1: each seed once"):
        main([*argv[:-2], "1", "1"])


def test_the_memory_estimate_counts_each_saved_tensor_once_and_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1),
        torch.nn.BatchNorm2d(2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 3),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # saved for the backward pass of one [1, 1, 4, 4] sample, in float32 values: the
    # convolution's input (16), batch norm's input (the convolution's output, 32) and ReLU's
    # output (32), which the linear layer saves again through its flattened view (the same
    # storage, counted once); batch norm's running statistics are buffers, held once
    expected = 4 * (16 + 32 + 32)
    assert memcheck.step_bytes(model, 1, 4, samples=5, extra=0) == 5 * expected
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert memcheck.step_bytes(model, 1, 4, samples=1, extra=3) == expected + 3 * weights
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training


def test_a_gpu_config_on_a_cpu_machine_is_named_at_the_start(monkeypatch, caplog):
    from xdtrain.config import load_config
    from xdtrain.models import get_model

    config = load_config("configs/demo/ft_imagenet.yaml")
    size, batch = config.data.image_size, config.data.batch_size
    model = get_model("resnet18", num_classes=10, in_channels=3, image_size=size)
    monkeypatch.setattr(memcheck, "available_bytes", lambda: 64 * 2**30)
    with caplog.at_level(logging.WARNING, "xdtrain.memcheck"):
        small = memcheck.check_step_memory(model, config, "configs/demo/ft_imagenet.yaml")
    assert caplog.records == [] and 0 < small < 2
    monkeypatch.setattr(memcheck, "available_bytes", lambda: int(small * 2**30))
    with caplog.at_level(logging.WARNING, "xdtrain.memcheck"):
        memcheck.check_step_memory(model, config, "my.yaml")
    (record,) = caplog.records
    said = record.getMessage()
    assert said.startswith(f"my.yaml is a GPU config: one step ({batch} samples at {size} px)")


def test_mlflow_missing_is_one_line_with_the_install_command(monkeypatch):
    from xdtrain.mlflow_log import check_installed

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(UserError, match=r"pip install 'xdtrain\[mlflow\]'"):
        check_installed()


def test_samples_and_numbers_in_display_are_not_rounded_away():
    assert display.text(np.float64(0.123456)) == "0.1235" and display.text(None) == "n/a"
