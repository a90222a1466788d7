from __future__ import annotations

from pathlib import Path

import pytest

from xdtrain.config import (
    Config,
    Range,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    main,
    save_config,
)
from xdtrain.errors import UserError, run_cli

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_shipped_configs_exist():
    assert any(p.name == "pt_simclr_imagenet.yaml" for p in CONFIGS)


def test_base_chain_merges_and_child_wins():
    cfg = load_config(Path(__file__).parent.parent / "configs/demo/pt_simclr_imagenet.yaml")
    assert cfg.task == "simclr"  # from pt_simclr_imagenet.yaml
    assert cfg.loss.temperature == 0.5  # from pt_simclr_imagenet.yaml
    assert cfg.run.seed == 0 and cfg.train.channels_last is False  # base.yaml; demo/base.yaml
    full = Path(__file__).parent.parent / "configs/pt_simclr_imagenet.yaml"
    assert load_config(full).train.channels_last is True  # the GPU configs keep NHWC
    assert cfg.train.log_every == 10  # demo/base.yaml, the second base, overrides base.yaml
    assert cfg.data.image_size == 32  # demo/base.yaml overrides 256
    assert cfg.optim.name == "adamw"  # the demo file itself overrides lars
    assert cfg.model.projection_dims == [512, 128]


def test_misspelled_key_names_file_path_and_suggestion(tmp_path):
    cfg = write(tmp_path / "exp.yaml", "optim:\n  name: sgd\n  lrr: 0.1\n")
    message = error_of(cfg)
    assert str(cfg) in message
    assert "'optim.lrr'" in message
    assert "did you mean 'optim.lr'?" in message


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    message = error_of(write(tmp_path / "exp.yaml", "train:\n  lr: 0.1\n"))
    assert "'train.lr'" in message and "did you mean 'optim.lr'?" in message


def test_stale_key_is_refused_with_valid_keys(tmp_path):
    message = error_of(write(tmp_path / "exp.yaml", "loss:\n  w_m: 0.5\n"))
    assert "unknown key 'loss.w_m'" in message
    assert "temperature" in message


def test_unknown_top_level_key(tmp_path):
    message = error_of(write(tmp_path / "exp.yaml", "optimizer:\n  lr: 0.1\n"))
    assert "unknown key 'optimizer'" in message and "did you mean 'optim'?" in message


def test_wrong_type_names_expected_type(tmp_path):
    cfg = write(tmp_path / "exp.yaml", "optim:\n  lr: fast\n")
    message = error_of(cfg)
    assert message == f"{cfg}: optim.lr: expected float, got str 'fast'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epochs: 2.5\n", "train.epochs: expected int, got float 2.5"),
        ("train:\n  epochs: true\n", "train.epochs: expected int, got bool True"),
        ("train:\n  compile: 1\n", "train.compile: expected bool (true/false), got int 1"),
        ("data:\n  backend: torch\n", "data.backend: expected one of 'dali', 'albumentations'"),
        ("train:\n  grad_clip: big\n", "train.grad_clip: expected float or null"),
        ("model:\n  projection_dims: 128\n", "model.projection_dims: expected a list of int"),
        ("model:\n  projection_dims: [128, x]\n", "model.projection_dims.1: expected int"),
        ("optim: 0.1\n", "optim: expected a mapping, got float 0.1"),
        ("optim:\n  lr: .nan\n", "optim.lr: expected float, got float nan"),
    ],
)
def test_wrong_types(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path / "exp.yaml", text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:\n  batch_size: -3\n", "data.batch_size: expected int >= 1, got int -3"),
        ("train:\n  epochs: 0\n", "train.epochs: expected int >= 1, got int 0"),
        ("optim:\n  lr: 0\n", "optim.lr: expected float > 0, got int 0"),
        ("data:\n  fraction: 1.5\n", "data.fraction: expected float in (0, 1], got float 1.5"),
        ("data:\n  fraction: 0\n", "data.fraction: expected float in (0, 1], got int 0"),
        ("optim:\n  momentum: 1\n", "optim.momentum: expected float in [0, 1), got int 1"),
        ("train:\n  grad_clip: -1\n", "train.grad_clip: expected float > 0, got int -1"),
        ("model:\n  num_classes: 0\n", "model.num_classes: expected int >= 1, got int 0"),
        ("data:\n  image_size: 8\n", "data.image_size: expected int >= 32, got int 8"),
    ],
)
def test_values_out_of_range_name_file_key_and_range(tmp_path, text, expected):
    cfg = write(tmp_path / "exp.yaml", text)
    assert error_of(cfg) == f"{cfg}: {expected}"


def test_range_limits_themselves_are_accepted(tmp_path):
    text = (
        "data:\n  fraction: 1.0\n  workers: 0\n  solarize: 1\n  image_size: 32\n"
        "optim:\n  momentum: 0\n  weight_decay: 0\n"
        "train:\n  grad_clip: null\n  epochs: 1\n"
    )
    cfg = load_config(write(tmp_path / "exp.yaml", text))
    assert (cfg.data.fraction, cfg.data.workers, cfg.train.grad_clip) == (1.0, 0, None)


def test_an_override_out_of_range_names_the_override(tmp_path):
    cfg = write(tmp_path / "exp.yaml", "task: simclr\n")
    message = error_of(cfg, ["data.batch_size=-3"])
    assert message == "--set data.batch_size=-3: data.batch_size: expected int >= 1, got int -3"


def test_range_describes_itself():
    assert [str(r) for r in (Range(1), Range(0, low_open=True), Range(0, 1, high_open=True))] == [
        ">= 1",
        "> 0",
        "in [0, 1)",
    ]
    assert str(Range(high=8, high_open=True)) == "< 8" and Range(high=8).admits(-3)
    assert Range(0, 1, low_open=True).admits(1) and not Range(0, 1, low_open=True).admits(0)
    assert Range(0, 1, high_open=True).admits(0) and not Range(0, 1, high_open=True).admits(1)


def test_float_written_like_1e_minus_3_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path / "exp.yaml", "optim:\n  lr: 1e-3\n  weight_decay: 0\n"))
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert isinstance(cfg.optim.weight_decay, float)


def test_error_in_base_file_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "train:\n  epochz: 3\n")
    child = write(tmp_path / "sub" / "child.yaml", "_base_: ../base.yaml\noptim:\n  lr: 0.5\n")
    message = error_of(child)
    assert message.startswith(str(tmp_path / "sub" / "../base.yaml"))
    assert Path(message.split(":")[0]).resolve() == base.resolve()


def test_list_of_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "optim:\n  lr: 0.1\n  name: sgd\n")
    write(tmp_path / "b.yaml", "optim:\n  lr: 0.2\n")
    cfg = load_config(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\ntrain:\n  epochs: 2\n"))
    assert (cfg.optim.lr, cfg.optim.name, cfg.train.epochs) == (0.2, "sgd", 2)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    assert "include each other" in error_of(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "optim:\n  lr: [0.1\n")
    message = error_of(bad)
    assert message.startswith(f"{bad}: line") and "YAML" in message
    assert "must be a mapping" in error_of(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path / "exp.yaml", "run:\n  name: x\n"),
        [
            "optim.lr=0.05",
            "train.epochs=7",
            "train.compile=true",
            "train.grad_clip=null",
            "model.projection_dims=[256, 64]",
            "run.name=0042",
            "model.encoder_weights=null",
            "data.backend=albumentations",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 7 and cfg.train.compile is True
    assert cfg.train.grad_clip is None and cfg.model.projection_dims == [256, 64]
    assert cfg.run.name == "0042"  # a string field keeps the text as typed
    assert cfg.model.encoder_weights is None and cfg.data.backend == "albumentations"


def test_override_errors(tmp_path):
    cfg = write(tmp_path / "exp.yaml", "")
    message = error_of(cfg, ["optim.lrr=0.1"])
    assert message.startswith("--set optim.lrr=0.1: unknown key") and "'optim.lr'" in message
    assert "expected KEY=VALUE" in error_of(cfg, ["optim.lr"])
    message = error_of(cfg, ["train.epochs=many"])
    assert message == "--set train.epochs=many: train.epochs: expected int, got str 'many'"


def test_dump_save_load_round_trip(tmp_path):
    cfg = load_config(write(tmp_path / "exp.yaml", "task: brats\noptim:\n  lr: 1e-4\n"))
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    text = dump_config(cfg)
    assert "task: brats" in text and "lr: 0.0001" in text


def test_cli_prints_and_saves(tmp_path, capsys):
    cfg = write(tmp_path / "exp.yaml", "train:\n  epochs: 3\n")
    assert main([str(cfg), "--set", "optim.lr=0.2", "--save", str(tmp_path / "out.yaml")]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "lr: 0.2" in out
    assert load_config(tmp_path / "out.yaml").optim.lr == 0.2


def test_cli_error_is_one_line_with_exit_2(tmp_path, capsys):
    cfg = write(tmp_path / "exp.yaml", "optim:\n  lrr: 0.1\n")
    assert run_cli(main, [str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "did you mean" in err
