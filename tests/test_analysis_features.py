"""Feature extraction and the kNN monitor on generated shards: the seeded sample, per-stage
embeddings against torchvision's own modules, stored features reused or recomputed, labels
of each data kind, the monitor's score against an independent recomputation, and training
that the monitor leaves untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision
from helpers import demo_args
from test_train import rows

from xdtrain.analysis.features import Features, encoder_source, extract
from xdtrain.config import load_config
from xdtrain.data import build_loader
from xdtrain.data.batch import sample_labels
from xdtrain.data.shardset import open_split, sample_of
from xdtrain.errors import UserError
from xdtrain.models.encoders import STAGES, build_encoder, encoder_name_of, stage_embeddings
from xdtrain.train import main as train_main


def data_of(config: str, shards, **changes):
    data = load_config(demo_args(config, shards, "unused")[0]).data
    return dataclasses.replace(
        data, shards=str(shards), image_size=32, workers=1, batch_size=4, **changes
    )


def stored_keys(shardset) -> list[str]:
    """Every sample key of a split, from the index files, in stored order."""
    keys = []
    for shard in range(len(shardset.paths)):
        keys += [ref.key for ref in shardset.sample_refs(shard)]
    return keys


def read_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def test_a_seeded_sample_is_read_exactly_whatever_the_ranks(packed):
    data = data_of("ft_chestxray8.yaml", packed["chestxray8"])
    whole = open_split(packed["chestxray8"], "chestxray8", "train")
    everything = stored_keys(whole)
    assert whole.samples == len(everything) > 12
    sample = sample_of(whole, 12, seed=3)
    assert sample.samples == 12 and sum(sample.counts) == 12
    again = sample_of(whole, 12, seed=3)
    other = sample_of(whole, 12, seed=4)
    assert again.positions == sample.positions and other.positions != sample.positions
    chosen = [
        everything[sum(whole.counts[:shard]) + p]
        for shard, positions in enumerate(sample.positions)
        for p in positions
    ]
    assert len(set(chosen)) == 12
    one = read_keys(build_loader(data, "train", train=False, sample=12, sample_seed=3))
    assert one == chosen  # the chosen samples, in stored order
    two = [
        read_keys(build_loader(data, "train", rank=r, world_size=2, train=False, sample=12,
                               sample_seed=3))
        for r in (0, 1)
    ]  # fmt: skip
    assert two[0] + two[1] == one and len(two[0]) == 6
    assert sample_of(whole, whole.samples + 5, seed=0) is whole  # more than there is: all
    with pytest.raises(ValueError):
        sample_of(whole, 0, seed=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_stage_embeddings_are_torchvision_modules_outputs_averaged(arch):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)().eval()
    encoder = build_encoder(arch)
    encoder.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    encoder.eval()
    seen = {}

    def keep(name):
        def hook(module, inputs, output):  # the stem's ReLU runs once: the first call
            seen.setdefault(name, output.mean(dim=(2, 3)))

        return hook

    names = ("relu", "layer1", "layer2", "layer3", "layer4")
    hooks = [getattr(net, name).register_forward_hook(keep(name)) for name in names]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        net(x)
        mine = stage_embeddings(encoder, x)
    for hook in hooks:
        hook.remove()
    reference = [seen[n] for n in names]
    for ours, theirs in zip(mine, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert encoder_name_of(encoder.state_dict()) == arch
    assert encoder_name_of({"conv1.weight": torch.zeros(1)}) is None


def test_features_are_stored_beside_the_run_and_reused_until_an_input_changes(packed, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(1)
    torch.save(build_encoder("resnet18").state_dict(), run / "encoder.pt")
    (run / "config.yaml").write_text("task: imagenet\n")
    data = data_of("ft_chestxray8.yaml", packed["chestxray8"])
    enc = encoder_source(run)
    assert enc.arch == "resnet18" and enc.label == "run" and enc.home == run
    (path,) = extract([enc], data, "train", samples=10, seed=0)
    assert path.parent == run / "features"
    features = Features.load(path)
    assert list(features.stages) == list(STAGES)
    assert [v.shape for v in features.stages.values()] == [
        (10, 64), (10, 64), (10, 128), (10, 256), (10, 512)
    ]  # fmt: skip
    assert features.labels.shape == (10, len(features.classes)) == (10, 15)
    assert features.meta["label_kind"] == "multilabel" and features.meta["samples"] == 10
    # the labels are the stored ones of those keys
    loader = build_loader(data, "train", train=False, sample=10, sample_seed=0)
    labels = {k: lab for b in loader for k, lab in zip(b["keys"], b["label"].numpy(), strict=True)}
    assert np.array_equal(features.labels, np.array([labels[k] for k in features.keys]) > 0.5)
    # the embeddings are the encoder's on those images
    net = build_encoder("resnet18")
    net.load_state_dict(torch.load(run / "encoder.pt", weights_only=True))
    net.eval()
    batch = next(iter(build_loader(data, "train", train=False, sample=10, sample_seed=0)))
    with torch.no_grad():
        expect = net(batch["image"]).numpy()
    np.testing.assert_allclose(features.stages["layer4"][:4], expect, rtol=1e-5, atol=1e-5)
    # reused while nothing changed; recomputed when the weights change
    stamp = path.stat().st_mtime_ns
    assert extract([enc], data, "train", samples=10, seed=0) == [path]
    assert path.stat().st_mtime_ns == stamp
    torch.manual_seed(2)
    torch.save(build_encoder("resnet18").state_dict(), run / "encoder.pt")
    (again,) = extract([encoder_source(run)], data, "train", samples=10, seed=0)
    assert again == path and path.stat().st_mtime_ns != stamp
    assert not np.allclose(Features.load(path).stages["layer4"], features.stages["layer4"])
    # another sample is another file; so is a training fraction (other patients)
    (other,) = extract([encoder_source(run)], data, "train", samples=8, seed=0)
    assert other != path and len(Features.load(other).keys) == 8
    tier = dataclasses.replace(data, fraction=0.5)
    (half,) = extract([encoder_source(run)], tier, "train", samples=8, seed=0)
    assert half not in (path, other) and Features.load(half).meta["fraction"] == 0.5
    whole = set(stored_keys(open_split(packed["chestxray8"], "chestxray8", "train", 0.5)))
    assert set(Features.load(half).keys.tolist()) <= whole


def test_encoder_sources_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no encoder.pt"):
        encoder_source(tmp_path)
    with pytest.raises(UserError, match="no such run folder"):
        encoder_source(tmp_path / "missing")
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(UserError, match="not a ResNet"):
        encoder_source(bad)
    with pytest.raises(UserError, match="unknown encoder 'resnet99'"):
        encoder_source("random:resnet99")
    assert encoder_source("random:resnet18").weights is None


def test_segmentation_labels_say_which_structures_a_slice_holds():
    mask = torch.full((3, 5, 6), -1, dtype=torch.int64)  # padding of the evaluation graph
    mask[0, :4, :4] = 0
    mask[1, :5, :6] = 0
    mask[1, 2, 2] = 3
    mask[2, :3, :3] = torch.tensor([[1, 0, 0], [0, 2, 0], [0, 0, 0]])
    labels = sample_labels({"mask": mask}, "presence", 3)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 0, 0], [0, 0, 1], [1, 1, 0]]


def _reference_knn(bank, bank_y, query, query_y, k, temperature, classes):
    """Wu et al.'s weighted vote, written out with numpy."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = q @ b.T
    hits = 0
    for i, row in enumerate(sims):
        top = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(classes)
        np.add.at(votes, bank_y[top], np.exp(row[top] / temperature))
        hits += int(np.argmax(votes) == query_y[i])
    return hits / len(query)


def test_the_knn_monitor_scores_the_encoder_and_leaves_training_untouched(packed, tmp_path):
    settings = ["data.batch_size=8", "train.epochs=2", "train.log_every=1"]
    monitor = ["monitor.every=1", "monitor.bank_samples=24", "monitor.query_samples=16",
               "monitor.k=5", "monitor.bank_split=train", "monitor.query_split=val"]  # fmt: skip
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    shards = packed["imagenet"]
    assert (
        train_main(demo_args("pt_simclr_imagenet.yaml", shards, watched, *settings, *monitor)) == 0
    )
    off = "monitor.every=0"  # the demo config monitors every epoch
    assert train_main(demo_args("pt_simclr_imagenet.yaml", shards, plain, *settings, off)) == 0
    watch = rows(watched, "monitor")
    assert [r["epoch"] for r in watch] == [0, 1, 2]  # the untrained encoder, then each epoch
    assert all({"knn_top1", "knn_chance", "knn_seconds"} <= set(r) for r in watch)
    assert not rows(plain, "monitor")
    # the monitor changes nothing of the training: the same losses, the same weights
    assert [r["loss"] for r in rows(watched, "train")] == [r["loss"] for r in rows(plain, "train")]
    a = torch.load(watched / "encoder.pt", weights_only=True)
    b = torch.load(plain / "encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the last score is the final encoder's, recomputed independently
    data = dataclasses.replace(load_config(watched / "config.yaml").data, augment="", batch_size=5)
    net = build_encoder("resnet18")
    net.load_state_dict(a)
    net.eval()

    def embed(split, count, seed):
        xs, ys = [], []
        for batch in build_loader(data, split, train=False, sample=count, sample_seed=seed):
            with torch.no_grad():
                xs.append(net(batch["image"]).numpy())
            ys.append(batch["label"].numpy())
        return np.concatenate(xs).astype(np.float64), np.concatenate(ys)

    bank, bank_y = embed("train", 24, 0)
    query, query_y = embed("val", 16, 1)
    classes = len(open_split(shards, "imagenet", "train").classes)
    expected = _reference_knn(bank, bank_y, query, query_y, 5, 0.07, classes)
    assert watch[-1]["knn_top1"] == pytest.approx(expected, abs=1e-9)
    majority = np.bincount(query_y, minlength=classes).max() / len(query_y)
    assert watch[-1]["knn_chance"] == pytest.approx(majority)


def test_the_monitor_refuses_what_would_mislead_in_one_line(packed):
    from xdtrain.monitor import KnnMonitor

    base = load_config(demo_args("pt_simclr_imagenet.yaml", packed["imagenet"], "unused")[0])
    base = dataclasses.replace(
        base, data=dataclasses.replace(base.data, shards=str(packed["imagenet"]))
    )

    def monitor(**changes):
        return KnnMonitor(
            dataclasses.replace(base, monitor=dataclasses.replace(base.monitor, **changes)), 0, 1
        )

    with pytest.raises(UserError, match="find itself in the bank"):
        monitor(every=1, bank_split="val", query_split="val")
    with pytest.raises(UserError, match=r"^monitor: the encoder takes data.channels=3"):
        monitor(every=1, dataset="brats", shards=str(packed["brats"]))
    assert monitor(every=1, dataset="lits", shards=str(packed["lits"])).kind == "presence"


def test_resuming_may_switch_the_monitor_but_not_change_what_it_scores(tmp_path):
    from xdtrain.config import save_config
    from xdtrain.train import absolute_paths, prepare_folder

    saved = absolute_paths(load_config(demo_args("pt_simclr_imagenet.yaml", tmp_path, tmp_path)[0]))
    off = dataclasses.replace(saved, monitor=dataclasses.replace(saved.monitor, every=0))
    save_config(off, tmp_path / "config.yaml")

    def resume(**changes):
        config = dataclasses.replace(saved, monitor=dataclasses.replace(saved.monitor, **changes))
        return prepare_folder(tmp_path, config, resume=True, force=False)

    assert resume(every=3, bank_samples=7) is False  # no monitor before: anything goes
    save_config(saved, tmp_path / "config.yaml")  # a run that monitored every epoch
    assert resume(every=2) is False
    with pytest.raises(UserError, match="monitor.bank_samples"):
        resume(bank_samples=7)


def test_timm_encoders_are_read_by_the_runs_model_name(packed, tmp_path):
    """A run of ``timm/<name>``: the architecture comes from the run's config.yaml (timm's
    keys say nothing of it); stages are its feature levels, then the pooled output."""
    from xdtrain.models import backbones

    run = tmp_path / "vit_run"
    run.mkdir()
    torch.manual_seed(3)
    net = backbones.build("timm/test_vit", 3, 32)
    torch.save(net.state_dict(), run / "encoder.pt")
    (run / "config.yaml").write_text("task: simclr\nmodel:\n  name: timm/test_vit\n")
    enc = encoder_source(run)
    assert enc.arch == "timm/test_vit"
    random = encoder_source("random:timm/test_vit")
    data = data_of("ft_chestxray8.yaml", packed["chestxray8"])
    mine, baseline = extract([enc, random], data, "val", samples=6, seed=0, out=tmp_path)
    assert baseline.name.endswith("_random-timm-test_vit.npz")
    features = Features.load(mine)
    assert list(features.stages) == ["blocks.0", "blocks.2", "blocks.3", "blocks.5", "output"]
    assert features.meta["stages"] == list(features.stages)
    batch = next(iter(build_loader(data, "val", train=False, sample=6, sample_seed=0)))
    net.eval()
    with torch.no_grad():
        expect = net(batch["image"]).numpy()
    n = len(expect)  # the first batch
    np.testing.assert_allclose(features.stages["output"][:n], expect, rtol=1e-5, atol=1e-5)
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    with pytest.raises(UserError, match="no run config.yaml beside it names the model"):
        encoder_source(bare)
