"""xdtrain.data: the batch contract, rank sharding, per-sample randomness, co-transform
alignment and bad-sample handling, on the DALI (CPU; GPU where there is one) and
albumentations backends."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from xdtrain.config import DataConfig
from xdtrain.data import build_loader
from xdtrain.data.dali_pipelines import Graph, build, external_batch
from xdtrain.data.presets import get_preset
from xdtrain.data.shardset import open_split
from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifests
from xdtrain.shards.base import png_bytes
from xdtrain.shards.tar import ShardWriter, parse_index
from xdtrain.synth.common import smooth_noise

DEVICES = ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
SEG_BACKENDS = [("dali", d) for d in DEVICES] + [("albumentations", "cpu")]
CHANNELS = {"imagenet": 3, "chestxray8": 3, "brats": 4, "lits": 1}
AUGMENT = {"imagenet": "standard", "chestxray8": "study", "brats": "segment", "lits": "segment"}


def data_config(folder, name, **kw) -> DataConfig:
    base = dict(
        dataset=name,
        shards=str(folder),
        augment=AUGMENT[name],
        image_size=48,
        channels=CHANNELS[name],
        batch_size=4,
        workers=2,
        device="cpu",
    )
    return DataConfig(**(base | kw))


def split_truth(folder: Path, split: str) -> dict[str, dict]:
    """Every sample of ``split`` read with the webdataset library: key -> components."""
    manifest = manifests.load(folder)
    urls = [str(folder / n) for n in manifests.shards(manifest, split)]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dataset", ["imagenet", "chestxray8", "brats", "lits"])
def test_eval_batches_hold_every_sample_once_with_its_label(packed, dataset, device):
    folder = packed[dataset]
    truth = split_truth(folder, "val")
    loader = build_loader(data_config(folder, dataset, device=device), "val")
    seen = []
    for batch in loader:
        keys = batch["keys"]
        seen += keys
        image = batch["image"]
        assert image.dtype == torch.float32 and image.shape[1:] == (CHANNELS[dataset], 48, 48)
        assert torch.isfinite(image).all() and image.std() > 0.05
        for i, key in enumerate(keys):
            sample = truth[key]
            if dataset == "imagenet":
                assert batch["label"][i].item() == int(sample["cls"])
            elif dataset == "chestxray8":
                expected = np.frombuffer(sample["labels.u8"], np.uint8)
                assert batch["label"][i].cpu().numpy().tolist() == expected.tolist()
            else:
                pos = np.frombuffer(sample["pos.i32"], "<i4")
                assert [batch[k][i].item() for k in ("case", "slice", "slices")] == pos.tolist()
                assert batch["mask"].dtype == torch.int64
                assert int(batch["mask"].max()) <= (3 if dataset == "brats" else 2)
    assert sorted(seen) == sorted(truth)
    assert len(loader) == -(-len(truth) // 4)


@pytest.mark.parametrize("device", DEVICES)
def test_simclr_batches_hold_n_views(packed, device):
    config = data_config(packed["imagenet"], "imagenet", augment="simclr", views=3, device=device)
    loader = build_loader(config, "train")
    batch = next(iter(loader))
    assert len(batch["views"]) == 3
    for view in batch["views"]:
        assert view.shape == (4, 3, 48, 48)
    assert batch["label"].shape == (4,) and batch["bad_samples"] == 0


def test_greyscale_simclr_gives_one_or_three_channels(packed):
    for channels in (1, 3):
        config = data_config(
            packed["chestxray8"], "chestxray8", augment="simclr", channels=channels
        )
        batch = next(iter(build_loader(config, "train")))
        assert batch["views"][0].shape == (4, channels, 48, 48)
        if channels == 3:  # the film replicated, not colour-jittered per channel
            view = batch["views"][0]
            assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 0], view[:, 2])


@pytest.mark.parametrize("backend,device", SEG_BACKENDS)
def test_training_epochs_give_full_batches_and_len(packed, backend, device):
    config = data_config(packed["brats"], "brats", backend=backend, device=device)
    loader = build_loader(config, "train")
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    assert all(b["image"].shape[0] == 4 and b["mask"].shape == (4, 48, 48) for b in batches)
    assert loader.epoch == 1


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("backend", ["dali", "albumentations"])
def test_two_ranks_read_disjoint_parts_that_cover_the_split(packed, backend):
    folder = packed["lits"]
    truth = split_truth(folder, "train")
    config = data_config(folder, "lits", backend=backend, batch_size=2, workers=1)
    parts = []
    for rank in (0, 1):
        loader = build_loader(config, "train", rank=rank, world_size=2, train=False)
        parts.append([k for batch in loader for k in batch["keys"]])
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(truth)
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    # training: every rank yields the same number of full batches
    lengths = [len(build_loader(config, "train", rank=r, world_size=2, train=True)) for r in (0, 1)]
    assert lengths[0] == lengths[1] == (len(truth) // 2) // 2


def test_epochs_shuffle_differently_and_replay_exactly(packed):
    config = data_config(packed["imagenet"], "imagenet")
    loader = build_loader(config, "train", seed=3)
    first = [k for b in loader for k in b["keys"]]
    second = [k for b in loader for k in b["keys"]]
    assert first != second
    again = build_loader(config, "train", seed=3)
    again.set_epoch(1)  # a resumed run at epoch 1 sees what the uninterrupted run saw
    assert [k for b in again for k in b["keys"]] == second


# --------------------------------------------------------------------------- randomness


def _same_sample_batch(packed, dataset, purpose, preset, views=2):
    folder = packed[dataset]
    shardset = open_split(folder, dataset, "train")
    ref = parse_index(Path(shardset.index_paths[-1]).read_text())[0]
    with open(shardset.paths[-1], "rb") as fh:
        sample = ref.read(fh)
    graph = Graph(
        purpose,
        shardset.layout,
        shardset.image_ext,
        shardset.bits,
        48,
        CHANNELS[dataset],
        views=views,
        aug=get_preset(preset, purpose.partition("_")[0]),
    )
    pipe = build(graph, batch_size=8, threads=2, seed=11, reader=None)
    info = f"{shardset.paths[-1]}:0:{ref.key}.x".encode()
    for name, data in external_batch(graph, [sample] * 8, [info] * 8).items():
        pipe.feed_input(name, data)
    return [np.asarray(out.as_tensor()) for out in pipe.run()]


def test_identical_inputs_in_one_batch_come_out_as_different_views(packed):
    view0, view1, *_ = _same_sample_batch(packed, "imagenet", "simclr", "simclr")
    distinct = {view0[i].tobytes() for i in range(8)}
    assert len(distinct) == 8
    assert not any(np.array_equal(view0[i], view1[i]) for i in range(8))


@pytest.mark.parametrize(
    "dataset,purpose,preset",
    [
        ("imagenet", "classify_train", "standard"),
        ("chestxray8", "classify_train", "standard"),
        ("brats", "segment_train", "segment"),
    ],
)
def test_each_sample_draws_its_own_augmentation(packed, dataset, purpose, preset):
    image = _same_sample_batch(packed, dataset, purpose, preset)[0]
    assert len({image[i].tobytes() for i in range(8)}) >= 6


def test_albumentations_draws_per_sample(packed):
    config = data_config(packed["brats"], "brats", backend="albumentations", workers=0)
    loader = build_loader(config, "train")
    raw = next(iter(wds.WebDataset(list(loader.shardset.paths), shardshuffle=False)))
    from xdtrain.data.albu_loader import transform

    compose = transform(loader.aug, 48)
    outs = [loader.prepare(raw, compose)["image"] for _ in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) >= 6


# --------------------------------------------------------------------------- alignment


def write_threshold_shards(folder: Path, dataset: str, count: int = 24) -> None:
    """Segmentation shards whose mask is exactly ``image[..., 0] >= 128`` (128 px)."""
    channels = 4 if dataset == "brats" else 1
    rng = np.random.default_rng(5)
    writer = ShardWriter(folder / "train-000000.tar")
    for i in range(count):
        field = smooth_noise(rng, (128, 128), 4)
        field = (field - field.min()) / (field.max() - field.min())
        image = np.repeat((field * 255).astype(np.uint8)[:, :, None], channels, axis=2)
        mask = (image[:, :, 0] >= 128).astype(np.uint8)
        writer.add(
            f"case{i:03d}_000",
            {
                "img.png": png_bytes(image if channels > 1 else image[:, :, 0]),
                "mask.png": png_bytes(mask),
                "pos.i32": np.array([i, 0, 1], "<i4").tobytes(),
            },
        )
    info = writer.close()
    shard = {"name": info.name, "samples": info.samples, "tier": "p100"}
    manifest = {
        "format": manifests.FORMAT,
        "dataset": dataset,
        "fractions": {},
        "options": {"bits": 8},
        "classes": ["background", "foreground"],
        "splits": {"train": {"samples": count, "shards": [shard]}},
    }
    (folder / manifests.NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("backend,device", SEG_BACKENDS)
@pytest.mark.parametrize("dataset", ["brats", "lits"])
def test_mask_stays_aligned_with_its_image(tmp_path, dataset, backend, device):
    write_threshold_shards(tmp_path, dataset)
    config = data_config(
        tmp_path,
        dataset,
        augment="segment_geometry",
        backend=backend,
        device=device,
        image_size=96,
        batch_size=8,
    )
    loader = build_loader(config, "train", seed=1)
    agreement, control = [], []
    for batch in loader:
        image = batch["image"][:, 0].cpu()  # normalised: (x - 0.5) / 0.25
        mask = batch["mask"].cpu()
        assert set(mask.unique().tolist()) <= {0, 1}
        predicted = (image * 0.25 + 0.5 >= 127.5 / 255).long()
        agreement += (predicted == mask).float().mean(dim=(1, 2)).tolist()
        # the test has power: a mask flipped on its own would disagree
        control += (predicted.flip(-1) == mask).float().mean(dim=(1, 2)).tolist()
    assert len(agreement) == len(loader) * 8 >= 16
    assert min(agreement) >= 0.98
    assert np.mean(control) < 0.9


# --------------------------------------------------------------------------- bad samples


def corrupt_copy(folder: Path, target: Path, ext: str) -> tuple[str, str]:
    """Copy a shard folder and overwrite the header of one ``ext`` member in train."""
    shutil.copytree(folder, target)
    manifest = manifests.load(target)
    name = manifests.shards(manifest, "train")[-1]
    ref = parse_index((target / name).with_suffix(".idx").read_text())[0]
    offset, size = next((o, s) for e, o, s in ref.parts if e == ext)
    with open(target / name, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * min(size, 64))
    return str(target / name), ref.key


def test_dali_replaces_a_sample_that_fails_to_decode(packed, tmp_path, caplog):
    shard, key = corrupt_copy(packed["imagenet"], tmp_path / "im", "jpg")
    config = data_config(tmp_path / "im", "imagenet")
    loader = build_loader(config, "train")
    with caplog.at_level(logging.WARNING, logger="xdtrain.data"):
        batches = list(loader)
    assert sum(b["bad_samples"] for b in batches) == 1 == loader.bad_samples
    assert all(b["image"].shape[0] == 4 for b in batches) and len(batches) == len(loader)
    assert key not in {k for b in batches for k in b["keys"]}
    assert any(key in r.getMessage() and shard in r.getMessage() for r in caplog.records)
    # later epochs read around it without failing again
    batches = list(loader)
    assert sum(b["bad_samples"] for b in batches) == 0 and loader.bad_samples == 1
    assert key not in {k for b in batches for k in b["keys"]}


def test_debug_raises_on_a_bad_sample(packed, tmp_path):
    shard, key = corrupt_copy(packed["imagenet"], tmp_path / "im", "jpg")
    loader = build_loader(data_config(tmp_path / "im", "imagenet"), "train", debug=True)
    with pytest.raises(UserError, match=key):
        list(loader)


def test_albumentations_replaces_a_bad_sample(packed, tmp_path, caplog):
    shard, key = corrupt_copy(packed["brats"], tmp_path / "b", "mask.png")
    config = data_config(tmp_path / "b", "brats", backend="albumentations", workers=0)
    loader = build_loader(config, "train", train=False)
    with caplog.at_level(logging.WARNING, logger="xdtrain.data"):
        keys = [k for b in loader for k in b["keys"]]
    assert loader.bad_samples == 1 and key not in keys
    assert any(key in r.getMessage() for r in caplog.records)
    debug = build_loader(config, "train", train=False, debug=True)
    with pytest.raises(UserError, match=key):
        list(debug)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change,message",
    [
        ({"shards": "/nonexistent/shards"}, "no shard folder"),
        ({"dataset": "lits"}, "holds 'imagenet' shards"),
        ({"augment": "simclr_typo"}, "unknown preset"),
        ({"augment": "segment"}, "is for segment"),
        ({"channels": 1}, "have 3 channels"),
        ({"fraction": 0.25}, "was not packed"),
        ({"batch_size": 100000}, "fewer than one batch"),
        ({"backend": "albumentations"}, "segmentation co-transforms only"),
    ],
)
def test_bad_settings_give_one_line_errors(packed, change, message):
    config = data_config(packed["imagenet"], "imagenet", **change)
    with pytest.raises(UserError, match=message) as info:
        build_loader(config, "train")
    assert "\n" not in str(info.value)


def test_a_preset_without_random_steps_gives_identical_outputs(packed):
    # the negative control of the per-sample tests above: no random step, no difference
    image = _same_sample_batch(packed, "imagenet", "classify_train", "none")[0]
    assert len({image[i].tobytes() for i in range(8)}) == 1


def test_albumentations_presets_without_random_steps_are_deterministic(packed):
    from xdtrain.data.albu_loader import transform
    from xdtrain.data.presets import PRESETS

    raw = next(
        iter(
            wds.WebDataset(open_split(packed["lits"], "lits", "val").paths[:1], shardshuffle=False)
        )
    )
    config = data_config(packed["lits"], "lits", backend="albumentations", workers=0)
    loader = build_loader(config, "val")
    for compose in (transform(None, 40), transform(PRESETS["segment_none"], 40)):
        first, second = (loader.prepare(raw, compose) for _ in range(2))
        assert torch.equal(first["image"], second["image"])
        assert first["image"].shape == (1, 40, 40) and first["mask"].shape == (40, 40)


# --------------------------------------------------------------------------- units


def test_get_preset_checks_name_and_purpose():
    from xdtrain.data.presets import for_greyscale

    assert get_preset("simclr", "simclr").blur_p == 0.5
    assert get_preset("simclr_study", "simclr").blur_p == 0.0
    assert get_preset("simclr", "simclr", solarize_p=0.2).solarize_p == 0.2
    with pytest.raises(UserError, match="did|unknown preset"):
        get_preset("simclrr", "simclr")
    with pytest.raises(UserError, match="is for classify"):
        get_preset("study", "segment")
    grey = for_greyscale(get_preset("simclr", "simclr"))
    assert (grey.saturation, grey.hue, grey.grey_p) == (0.0, 0.0, 0.0)
    assert grey.brightness == 0.8 and grey.contrast == 0.8


def test_rank_range_matches_dali_sharding():
    from xdtrain.data.shardset import rank_range

    parts = [rank_range(10, r, 3) for r in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]


def test_key_of_reads_dali_source_info():
    from xdtrain.data.batch import key_of

    info = b"/data/shards/train-p100-000003.tar:1536:n01440764_10026.label.i64\0\0"
    assert key_of(info) == ("/data/shards/train-p100-000003.tar", "n01440764_10026")


def test_resolve_device():
    from xdtrain.data import resolve_device

    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == "gpu"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("gpu")
