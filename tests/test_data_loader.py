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
from helpers import DEVICES, on_gpu

from xdtrain.config import DataConfig
from xdtrain.data import build_loader
from xdtrain.data.dali_pipelines import Graph, build, external_batch
from xdtrain.data.presets import PRESETS, get_preset
from xdtrain.data.shardset import open_split
from xdtrain.errors import UserError
from xdtrain.shards import manifest as manifests
from xdtrain.shards.base import decode_png, png_bytes
from xdtrain.shards.tar import ShardWriter, parse_index
from xdtrain.synth.common import smooth_noise

SEG_BACKENDS = [("dali", "cpu"), on_gpu("dali", "gpu"), ("albumentations", "cpu")]
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


def corrupt_copy(
    folder: Path, target: Path, ext: str, split: str = "train", picks=((-1, 0),)
) -> tuple[str, str]:
    """Copy a shard folder and overwrite the header of the ``ext`` member of the samples
    ``picks`` (shard number in ``split``, sample number); the first one's shard and key."""
    shutil.copytree(folder, target)
    names = manifests.shards(manifests.load(target), split)
    hit = []
    for shard, sample in picks:
        name = names[shard]
        ref = parse_index((target / name).with_suffix(".idx").read_text())[sample]
        offset, size = next((o, s) for e, o, s in ref.parts if e == ext)
        with open(target / name, "r+b") as fh:
            fh.seek(offset)
            fh.write(b"\0" * min(size, 64))
        hit.append((str(target / name), ref.key))
    return hit[0]


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


def test_dali_recovers_every_bad_batch_and_a_resumed_loader_reads_the_same(packed, tmp_path):
    """Several bad samples in several batches: each batch is rebuilt (the fallback pipeline
    is fresh each time). A loader resumed at epoch 1 with the first loader's state reads
    exactly what the first read in epoch 1."""
    picks = ((0, 0), (-1, 0), (-1, 1))
    corrupt_copy(packed["imagenet"], tmp_path / "im", "jpg", picks=picks)
    config = data_config(tmp_path / "im", "imagenet", batch_size=2)
    first = build_loader(config, "train", seed=4)
    epoch0 = list(first)
    assert sum(b["bad_samples"] for b in epoch0) == 3 == first.bad_samples
    assert sum(b["bad_samples"] > 0 for b in epoch0) >= 2  # more than one batch rebuilt
    state = first.state_dict()
    epoch1 = list(first)
    resumed = build_loader(config, "train", seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    for a, b in zip(epoch1, resumed, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("backend", ["dali", "albumentations"])
def test_evaluation_leaves_a_bad_sample_out_instead_of_counting_a_stand_in(
    packed, tmp_path, backend
):
    shard, key = corrupt_copy(packed["lits"], tmp_path / "l", "img.png", split="val")
    config = data_config(tmp_path / "l", "lits", backend=backend, batch_size=4, workers=1)
    truth = split_truth(tmp_path / "l", "val")
    loader = build_loader(config, "val")
    for _ in range(2):  # every epoch: read, found bad, left out
        batches = list(loader)
        keys = [k for b in batches for k in b["keys"]]
        assert sorted(keys) == sorted(set(truth) - {key})  # once each, the bad one never
        assert sum(b["bad_samples"] for b in batches) == 1
        assert all(len(b["keys"]) == len(b["mask"]) == len(b["case"]) for b in batches)


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
    stored = decode_png(raw["mask.png"]).shape
    config = data_config(packed["lits"], "lits", backend="albumentations", workers=0)
    for split, compose, mask_shape in (
        ("val", transform(None, 40), stored),  # evaluation: the mask as stored
        ("train", transform(PRESETS["segment_none"], 40), (40, 40)),
    ):
        loader = build_loader(config, split)
        first, second = (loader.prepare(raw, compose) for _ in range(2))
        assert torch.equal(first["image"], second["image"])
        assert torch.equal(first["mask"], second["mask"])
        assert first["image"].shape == (1, 40, 40) and first["mask"].shape == mask_shape


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


# --------------------------------------------------------------------------- epoch order


def _bench_epoch_order():
    import importlib.util

    path = Path(__file__).parent.parent / "tools" / "bench_epoch_order.py"
    spec = importlib.util.spec_from_file_location("bench_epoch_order", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_consecutive_epochs_are_nearly_independent_orders(tmp_path):
    """A sample's place in one epoch says almost nothing of its place in the next, and pairs
    that share a batch share one again about as often as in independent random orders
    (reading the shards in a fixed order gave r = 0.97 and five times the random rate)."""
    from xdtrain.data.order import RUN

    bench = _bench_epoch_order()
    bench.write_shards(tmp_path, 4000, 400, seed=0)
    first, second, third = bench.epoch_orders(tmp_path, batch=32, epochs=3, seed=0)
    figures = bench.order_figures(first, second)
    assert figures["samples"] == 4000 - 4000 % 32 and figures["pairs"] > 50000
    for epoch in (first, second, third):  # every sample at most once, all but a batch's worth
        keys = [k for batch in epoch for k in batch]
        assert len(set(keys)) == len(keys) == 4000 - 4000 % 32
    # positions move in runs of 64, so r of independent orders spreads by about 1/sqrt(63)
    spread = 1 / np.sqrt(4000 / RUN)
    assert abs(figures["position_r"]) < 3 * spread
    assert figures["cobatch_repeat"] < 1.5 * figures["cobatch_random"]
    assert abs(bench.order_figures(second, third)["position_r"]) < 3 * spread
    # resume: a loader that starts at epoch 2 reads epoch 2 exactly
    assert bench.epoch_orders(tmp_path, batch=32, epochs=3, seed=0)[2] == third


def test_epoch_order_pieces_cover_the_split_once_per_rank():
    from xdtrain.data.order import RUN, epoch_order, rank_pieces

    counts = [300, 0, 130, 64, 1]
    order = epoch_order(counts, seed=4, epoch=2, train=True)
    seen = [(p.shard, i) for p in order for i in p.positions]
    assert sorted(seen) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
    assert all(len(p.positions) <= RUN for p in order)
    assert order != epoch_order(counts, seed=4, epoch=3, train=True)
    assert order == epoch_order(counts, seed=4, epoch=2, train=True)
    for world in (1, 2, 3):
        parts = [rank_pieces(order, r, world) for r in range(world)]
        flat = [[(p.shard, i) for p in part for i in p.positions] for part in parts]
        assert sum(flat, []) == seen  # contiguous parts of the order, in rank order
        assert max(map(len, flat)) - min(map(len, flat)) <= 1
    evaluation = epoch_order(counts, seed=4, epoch=2, train=False)
    assert [(p.shard, i) for p in evaluation for i in p.positions] == sorted(seen)


# --------------------------------------------------------------------------- workers


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(b["keys"], b["image"].cpu(), b["mask"].cpu()) for b in loader]


@pytest.mark.parametrize("backend", ["dali", "albumentations"])
def test_batches_do_not_depend_on_the_worker_count(packed, backend):
    """``data.workers`` may change on --resume: samples, order, augmentation and len() stay."""
    runs = []
    for workers in (0, 1, 2) if backend == "albumentations" else (1, 2):
        config = data_config(packed["lits"], "lits", backend=backend, batch_size=2, workers=workers)
        loader = build_loader(config, "train", seed=5)
        runs.append((len(loader), _epoch(loader, 1)))
    (length, reference), *others = runs
    assert length == len(reference) > 2
    for other_length, batches in others:
        assert other_length == length
        for (keys_a, image_a, mask_a), (keys_b, image_b, mask_b) in zip(
            reference, batches, strict=True
        ):
            assert keys_a == keys_b
            assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)


# --------------------------------------------------------------------------- evaluation


def write_sized_shards(folder: Path, sizes: list[int]) -> dict[str, np.ndarray]:
    """LiTS-like val shards whose slices have the given side lengths; key -> stored mask."""
    rng = np.random.default_rng(7)
    writer = ShardWriter(folder / "val-000000.tar")
    masks = {}
    for i, side in enumerate(sizes):
        image = rng.integers(0, 255, (side, side), dtype=np.uint8)
        mask = rng.integers(0, 3, (side, side), dtype=np.uint8)
        key = f"volume-{i}_000"
        writer.add(
            key,
            {
                "img.png": png_bytes(image),
                "mask.png": png_bytes(mask),
                "pos.i32": np.array([i, 0, 1], "<i4").tobytes(),
            },
        )
        masks[key] = mask
    info = writer.close()
    manifest = {
        "format": manifests.FORMAT,
        "dataset": "lits",
        "fractions": {},
        "options": {"bits": 8, "slices": "all"},
        "preprocessing": {},
        "classes": ["background", "liver", "tumour"],
        "splits": {
            "val": {
                "samples": len(sizes),
                "shards": [{"name": info.name, **{"samples": info.samples, "tier": "p100"}}],
            }
        },
    }
    (folder / manifests.NAME).write_text(json.dumps(manifest))
    return masks


@pytest.mark.parametrize("backend,device", SEG_BACKENDS)
def test_evaluation_masks_are_the_stored_masks(tmp_path, backend, device):
    """Scores are computed at the stored grid: evaluation batches carry each slice's mask as
    stored (padded with -1 to the batch's largest), the image at the network's size."""
    masks = write_sized_shards(tmp_path, [64, 64, 40, 64, 52])
    config = data_config(tmp_path, "lits", backend=backend, device=device, batch_size=3)
    seen = set()
    for batch in build_loader(config, "val"):
        assert batch["image"].shape[-2:] == (48, 48)
        side = max(masks[k].shape[0] for k in batch["keys"])
        assert batch["mask"].shape[1:] == (side, side)
        for i, key in enumerate(batch["keys"]):
            stored = masks[key]
            h, w = stored.shape
            mask = batch["mask"][i].cpu().numpy()
            assert np.array_equal(mask[:h, :w], stored)
            assert (mask[h:] == -1).all() and (mask[:, w:] == -1).all()
            seen.add(key)
    assert seen == set(masks)


def test_segmentation_scores_logits_brought_back_to_the_stored_grid():
    """Upsample the logits (bilinear), then argmax: a structure thinner than a network pixel
    is still scored against the stored truth, and padding counts nowhere."""
    from xdtrain.tasks.segmentation import to_mask_grid

    logits = torch.randn(2, 3, 8, 8)
    mask = torch.full((2, 16, 16), -1, dtype=torch.int64)
    mask[0] = 1
    mask[1, :12, :12] = 2
    grid = to_mask_grid(logits, mask)
    assert grid.shape == (2, 3, 16, 16)
    full = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear")
    assert torch.allclose(grid[0], full[0])
    small = torch.nn.functional.interpolate(logits[1:], size=(12, 12), mode="bilinear")
    assert torch.allclose(grid[1, :, :12, :12], small[0]) and (grid[1, :, 12:] == 0).all()


def test_classification_evaluation_is_what_training_sees_without_a_crop(packed):
    """The study preset evaluates the whole film resized, exactly as its training graph
    treats a film it does not crop; the standard (ImageNet) preset takes the centre crop."""
    from dataclasses import replace

    shardset = open_split(packed["chestxray8"], "chestxray8", "val")
    ref = parse_index(Path(shardset.index_paths[0]).read_text())[0]
    with open(shardset.paths[0], "rb") as fh:
        sample = ref.read(fh)
    study = get_preset("study", "classify")
    uncropped = replace(
        study,
        crop_p=0.0,
        flip_p=0.0,
        jitter_p=0.0,
        grey_p=0.0,
        blur_p=0.0,
        sharpness_p=0.0,
        noise_p=0.0,
    )

    def output(purpose, aug):
        graph = Graph(purpose, shardset.layout, shardset.image_ext, shardset.bits, 48, 3, aug=aug)
        pipe = build(graph, batch_size=1, threads=1, seed=3, reader=None)
        for name, data in external_batch(graph, [sample], [b"x:0:k.png"]).items():
            pipe.feed_input(name, data)
        return np.asarray(pipe.run()[0][0])

    assert study.eval_resize == "whole"
    evaluation = output("classify_eval", study)
    assert np.array_equal(evaluation, output("classify_train", uncropped))
    assert get_preset("standard", "classify").eval_resize == "centre_crop"
    cropped = output("classify_eval", get_preset("standard", "classify"))
    assert cropped.shape == evaluation.shape and not np.array_equal(cropped, evaluation)


@pytest.mark.parametrize("backend,device", SEG_BACKENDS)
@pytest.mark.parametrize("preset", [n for n, p in PRESETS.items() if p.purpose == "segment"])
def test_every_segmentation_preset_trains_and_evaluates(packed, preset, backend, device):
    config = data_config(packed["brats"], "brats", augment=preset, backend=backend, device=device)
    for split in ("train", "val"):
        batch = next(iter(build_loader(config, split)))
        assert batch["image"].shape[1:] == (4, 48, 48) and torch.isfinite(batch["image"]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", [n for n, p in PRESETS.items() if p.purpose != "segment"])
def test_every_classification_and_simclr_preset_runs(packed, preset, device):
    for dataset in ("imagenet", "chestxray8"):
        config = data_config(packed[dataset], dataset, augment=preset, device=device)
        for split in ("train", "val"):
            batch = next(iter(build_loader(config, split)))
            images = batch["views"] if "views" in batch else [batch["image"]]
            assert all(torch.isfinite(v).all() and v.shape[-2:] == (48, 48) for v in images)
