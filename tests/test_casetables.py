"""xd-eval's per-case and per-class tables (:mod:`xdtrain.casetables`) against MONAI,
scikit-learn and nibabel: HD95 in mm from the voxel spacing the shard writers store, and
per-class AUROC with patient-level bootstrap intervals."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_metrics import _cases, _feed, _monai, _monai_hd95
from test_shard_nifti import BRATS_ROOT, ct_anatomy, mr_anatomy, pack, samples, save_as

from xdtrain import casetables
from xdtrain.data.shardset import open_split
from xdtrain.errors import UserError
from xdtrain.evaluate import main as eval_main
from xdtrain.metrics import LITS_REGIONS
from xdtrain.shards import manifest as manifests
from xdtrain.shards.base import decode_png
from xdtrain.tasks.classify import log_odds
from xdtrain.tasks.segmentation import RegionScores

NO_KEY = object()


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def fake_split(folder: Path, cases: list[str], spacing=NO_KEY) -> SimpleNamespace:
    """A shard folder's manifest holding only ``preprocessing`` (``cases`` and, unless
    NO_KEY, ``case_spacing_mm``), and the parts of a ShardSet the tables read."""
    record: dict = {"cases": cases}
    if spacing is not NO_KEY:
        record["case_spacing_mm"] = spacing
    manifest = {"format": manifests.FORMAT, "preprocessing": record}
    manifests.save(folder, manifest, fsync=False)
    return SimpleNamespace(folder=folder, classes=("background", "liver", "tumour"))


# --------------------------------------------------------------------------- segmentation


def test_cases_csv_holds_monais_hd95_in_mm_and_dice_per_case_and_region(tmp_path):
    cases = _cases(LITS_REGIONS, 2, shape=(33, 40))  # case ids 11..15
    names = [f"volume-{i}" for i in range(16)]
    spacing = [[1.0 + 0.25 * i, 0.7, 0.9] for i in range(16)]
    scores = RegionScores(LITS_REGIONS)
    tables = casetables.Tables("segmentation", fake_split(tmp_path, names, spacing), scores)
    _feed(scores.metric, cases, size=(40, 40))  # shuffled, padded slices
    scores.compute()
    [path] = tables.write(tmp_path, "test")
    assert Path(path).name == "cases_test.csv"
    rows = read_csv(path)
    assert tuple(rows[0]) == casetables.CASE_COLUMNS
    assert [(r["case"], r["region"]) for r in rows] == [
        (names[c], region) for c in sorted(cases) for region in LITS_REGIONS
    ]
    overlap = _monai(cases, LITS_REGIONS)  # MONAI's Dice and IoU per case and region
    worst = 0.0
    for row in rows:
        case = names.index(row["case"])
        r = list(LITS_REGIONS).index(row["region"])
        labels = LITS_REGIONS[row["region"]]
        pred, target = (np.isin(v, labels) for v in cases[case])
        assert float(row["dice"]) == pytest.approx(overlap[case]["dice"][r], abs=1e-6)
        assert float(row["iou"]) == pytest.approx(overlap[case]["iou"][r], abs=1e-6)
        assert int(row["slices"]) == cases[case][1].shape[0]
        if pred.any() and target.any():
            exact, reference = _monai_hd95(pred, target, spacing[case])
            assert float(row["hd95_mm"]) == pytest.approx(exact, rel=1e-6)
            assert float(row["hd95_mm"]) == pytest.approx(reference, rel=1e-5)
            worst = max(worst, abs(float(row["hd95_mm"]) - exact) / exact)
        else:  # MONAI: NaN or inf; ours 0 (both empty) or inf (one empty)
            assert row["hd95_mm"] == ("0.0" if not pred.any() and not target.any() else "inf")
    assert worst < 1e-6


@pytest.mark.parametrize(
    "spacing, says",
    [(NO_KEY, "packed by an older xd-shard.*re-shard"), (None, "no voxel spacing stored")],
)
def test_without_stored_spacing_hd95_is_left_empty_with_one_warning(
    tmp_path, caplog, spacing, says
):
    cases = _cases(LITS_REGIONS, 2)
    scores = RegionScores(LITS_REGIONS)
    with caplog.at_level(logging.WARNING, logger="xdtrain.casetables"):
        tables = casetables.Tables(
            "segmentation", fake_split(tmp_path, [f"v{i}" for i in range(16)], spacing), scores
        )
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith(str(tmp_path)) and "HD95 left out" in message
    assert re.search(says, message)
    _feed(scores.metric, cases)
    scores.compute()
    rows = read_csv(tables.write(tmp_path, "val")[0])
    assert len(rows) == 5 * 3 and all(r["hd95_mm"] == "" for r in rows)
    assert all(r["dice"] for r in rows)


def test_a_malformed_spacing_record_names_the_manifest(tmp_path):
    split = fake_split(tmp_path, ["a", "b"], [[1.0, 1.0, 1.0], [1.0, -2.0, 1.0]])
    with pytest.raises(UserError, match=r"manifest.json: preprocessing.case_spacing_mm of b"):
        casetables.Tables("segmentation", split, RegionScores(LITS_REGIONS))
    split = fake_split(tmp_path, ["a", "b"], [[1.0, 1.0, 1.0]])
    with pytest.raises(UserError, match="one spacing per case"):
        casetables.Tables("segmentation", split, RegionScores(LITS_REGIONS))


def canonical_spacing(path: Path) -> list[float]:
    """nibabel's voxel size of a NIfTI file along a rebuilt volume's axes (slice, PNG row,
    PNG column): its closest-canonical (RAS) zooms (x, y, z) reversed (LPS axes 2, 1, 0)."""
    x, y, z = nib.as_closest_canonical(nib.load(path)).header.get_zooms()[:3]
    return [float(z), float(y), float(x)]


def test_synthetic_releases_store_the_spacing_of_their_nifti_files(raw, packed):
    for name, image in (("brats", "{}_flair.nii*"), ("lits-nifti", "{}.nii")):
        record = manifests.load(packed[name])["preprocessing"]
        assert len(record["case_spacing_mm"]) == len(record["cases"]) > 0
        for case, stored in zip(record["cases"], record["case_spacing_mm"], strict=True):
            [path] = (raw / name).rglob(image.format(case))
            assert stored == pytest.approx(canonical_spacing(path), rel=1e-6), (name, case)
    assert manifests.load(packed["lits"])["preprocessing"]["case_spacing_mm"] is None  # PNGs


def test_spacing_follows_the_stored_slices_whatever_the_files_orientation(tmp_path):
    """Volumes of 0.8 x 0.7 x 2.5 mm (LPS axes 0, 1, 2) saved in four orientations: each
    stores (2.5, 0.7, 0.8), as nibabel reads the files; PNG rows run along the 0.7 mm axis."""
    src = tmp_path / "src"
    src.mkdir()
    hu, labels = ct_anatomy()
    for n, orientation in enumerate(("LPS", "RAS", "swapped", "IAR")):
        save_as(src / f"volume-{n}.nii", hu, orientation)
        save_as(src / f"segmentation-{n}.nii", labels, orientation)
    brats = tmp_path / "brats"
    volumes, seg = mr_anatomy()
    for n, orientation in enumerate(("LPS", "RAS", "swapped")):
        folder = brats / BRATS_ROOT / f"BraTS20_Training_00{n}"
        folder.mkdir(parents=True)
        for m, volume in [*volumes.items(), ("seg", seg)]:
            save_as(folder / f"{folder.name}_{m}.nii", volume, orientation)
    for dataset, root, pattern in (
        ("lits", src, "{}.nii"),
        ("brats", brats, "{}_flair.nii"),
    ):
        out = tmp_path / f"{dataset}-out"
        record = pack(dataset, root, out)["preprocessing"]
        for case, stored in zip(record["cases"], record["case_spacing_mm"], strict=True):
            [path] = root.rglob(pattern.format(case))
            assert stored == pytest.approx(canonical_spacing(path), rel=1e-6)
            assert stored == pytest.approx([2.5, 0.7, 0.8])
        mask = decode_png(next(iter(samples(out).values()))["mask.png"])
        assert mask.shape == (hu.shape[1], hu.shape[0])  # rows: LPS axis 1 (0.7 mm)


# --------------------------------------------------------------------------- classification


def test_weighted_auroc_equals_scikit_learn_with_sample_weights():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=80), 1)  # ties
    labels = (rng.random(80) < 0.3).astype(np.uint8)
    weights = rng.integers(0, 4, size=(6, 80))
    weights[5] = np.where(labels == 1, 0, weights[5])  # no positive drawn: undefined
    ours = casetables.weighted_auroc(scores, labels, weights)
    for row in range(5):
        expected = roc_auc_score(labels, scores, sample_weight=weights[row])
        assert ours[row] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(ours[5])
    assert casetables.weighted_auroc(scores, labels, np.ones((1, 80)))[0] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_one_vs_rest_scores_equal_the_tasks_log_odds():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(8, 6), 60 * torch.randn(8, 6)])  # some saturate
    expected = log_odds(logits)
    ours = casetables.one_vs_rest_scores(logits)
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-9)


def patient_data(patients: int = 40, seed: int = 0):
    """Scores [N, 3], labels [N, 3] and cluster index [N] of 1-5 samples per patient."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(patients), rng.integers(1, 6, patients))
    labels = (rng.random((len(groups), 3)) < 0.3).astype(np.uint8)
    scores = labels + rng.normal(scale=1.2, size=labels.shape)
    return scores, labels, groups


def test_intervals_hold_the_estimate_and_repeat_with_the_seed():
    scores, labels, groups = patient_data()
    rows = casetables.class_rows(scores, labels, groups, ["a", "b", "c"], 300, seed=0)
    for name, auroc, low, high, positives, negatives, patients, used in rows:
        assert low < auroc < high and used == 300 and patients == 40
        assert positives + negatives == len(groups)
        assert auroc == roc_auc_score(labels[:, "abc".index(name)], scores[:, "abc".index(name)])
    assert casetables.class_rows(scores, labels, groups, ["a", "b", "c"], 300, seed=0) == rows
    other = casetables.class_rows(scores, labels, groups, ["a", "b", "c"], 300, seed=1)
    assert [r[2] for r in other] != [r[2] for r in rows]


def test_the_bootstrap_resamples_whole_patients():
    """Every sample of a patient copied three more times: the patient bootstrap's intervals
    stay as they were (each resample draws the same patients), a sample-level bootstrap's
    narrow by about half (four times the samples, wrongly taken as independent)."""
    scores, labels, groups = patient_data(patients=60, seed=1)
    once = casetables.bootstrap_aurocs(scores, labels, groups, 400, seed=3)
    copies = np.repeat(np.arange(len(groups)), 4)
    four = casetables.bootstrap_aurocs(scores[copies], labels[copies], groups[copies], 400, 3)
    assert np.allclose(once, four, atol=1e-12)
    flat = casetables.bootstrap_aurocs(
        scores[copies], labels[copies], np.arange(len(copies)), 400, seed=3
    )

    def width(values):
        low, high = np.percentile(values, [2.5, 97.5], axis=0)
        return high - low

    assert (width(flat) < 0.7 * width(once)).all()
    counts = casetables.resample_counts(60, 7, seed=3)  # resample 7: patients drawn
    assert counts.sum() == 60 and (counts == 0).any() and counts.max() > 1


def test_resamples_where_a_class_has_one_label_are_skipped_and_counted():
    groups = np.repeat(np.arange(30), 2)
    labels = np.zeros((60, 1), np.uint8)
    labels[:2] = 1  # only patient 0 is positive
    scores = labels + np.random.default_rng(0).normal(size=labels.shape)
    [row] = casetables.class_rows(scores, labels, groups, ["rare"], 200, seed=5)
    drawn = sum(casetables.resample_counts(30, r, 5)[0] > 0 for r in range(200))
    assert row[-1] == drawn < 200  # resamples without patient 0 have no AUROC
    [none] = casetables.class_rows(scores, 0 * labels, groups, ["absent"], 200, seed=5)
    assert none == ["absent", None, None, None, 0, 60, 30, 0]


def test_classes_csv_reads_each_samples_patient_from_the_shards(packed, tmp_path):
    shardset = open_split(packed["chestxray8"], "chestxray8", "test")
    patients = casetables.sample_patients(shardset)
    manifest = manifests.load(packed["chestxray8"])
    assert set(patients.values()) == set(manifest["splits"]["test"]["patient_ids"])
    keys = sorted(patients)
    rng = np.random.default_rng(0)
    labels = (rng.random((len(keys), shardset.num_classes)) < 0.4).astype(np.float32)
    labels[:2] = [[1], [0]]  # every class has both labels
    logits = labels + rng.normal(size=labels.shape)
    tables = casetables.Tables("multilabel", shardset, None, resamples=50)
    for start in range(0, len(keys), 7):  # batches as evaluate gives them
        part = slice(start, start + 7)
        batch = {"keys": keys[part], "label": torch.tensor(labels[part])}
        tables(batch, torch.tensor(logits[part]))
    [path] = tables.write(tmp_path, "test")
    rows = read_csv(path)
    assert tuple(rows[0]) == casetables.CLASS_COLUMNS
    assert [r["class"] for r in rows] == list(shardset.classes)
    for c, row in enumerate(rows):
        assert float(row["auroc"]) == pytest.approx(roc_auc_score(labels[:, c], logits[:, c]))
        assert int(row["patients"]) == len(set(patients.values())) < len(keys)
        assert float(row["ci_low"]) <= float(row["auroc"]) <= float(row["ci_high"])
    assert tables.bootstrap == {
        "resamples": 50,
        "seed": casetables.SEED,
        "unit": "patient",
        "clusters": len(set(patients.values())),
        "interval": "percentile, 95%",
    }


def test_images_without_patients_are_their_own_units_and_costly_bootstraps_are_refused(
    packed, tmp_path, caplog, monkeypatch
):
    shardset = open_split(packed["imagenet"], "imagenet", "val")
    keys = sorted(casetables.sample_patients(shardset))
    count = shardset.num_classes
    labels = torch.arange(len(keys)) % count
    logits = torch.nn.functional.one_hot(labels, count).float() + torch.randn(len(keys), count)
    tables = casetables.Tables("multiclass", shardset, None, resamples=1000)
    tables({"keys": keys, "label": labels}, logits)
    monkeypatch.setattr(casetables, "BOOTSTRAP_LIMIT", 10.0)
    with caplog.at_level(logging.WARNING, logger="xdtrain.casetables"):
        rows = read_csv(tables.write(tmp_path, "val")[0])
    assert "too costly" in caplog.text and "--bootstrap 0" in caplog.text
    assert tables.bootstrap["unit"] == "image" and tables.bootstrap["resamples"] == 0
    for c, row in enumerate(rows):
        assert row["patients"] == str(len(keys)) and row["bootstrap"] == "0"
        assert row["ci_low"] == row["ci_high"] == ""
        scores = casetables.one_vs_rest_scores(logits)[:, c].numpy()
        assert float(row["auroc"]) == pytest.approx(roc_auc_score(labels == c, scores))


def test_bad_patient_records_and_resample_counts_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="sample b names no patient in its json"):
        casetables.clusters(["a", "b"], {"a": "p1", "b": None}, tmp_path)
    with pytest.raises(UserError, match="--bootstrap -1"):
        casetables.Tables("multilabel", SimpleNamespace(folder=tmp_path), None, resamples=-1)


# --------------------------------------------------------------------------- xd-eval


def run_copy(grid_runs: Path, folder: Path) -> Path:
    """A run folder of its own holding one of the tiny LiTS runs (config and checkpoint)."""
    folder.mkdir()
    shutil.copy(grid_runs / "scratch0" / "config.yaml", folder)
    (folder / "final.pt").symlink_to(grid_runs / "scratch0" / "final.pt")
    return folder


def test_xd_eval_writes_the_cases_table(grid_runs, packed, tmp_path, capsys, caplog):
    """The run's own shards (the LiTS PNG release: no spacing, HD95 left empty with a
    warning), then the NIfTI release's shards (HD95 in mm for every row)."""
    for shards, spaced in ((None, False), (packed["lits-nifti"], True)):
        run = run_copy(grid_runs, tmp_path / f"run{int(spaced)}")
        caplog.clear()
        extra = ["--shards", str(shards)] if shards else []
        assert eval_main([str(run), "--split", "test", "--overlays", "1", *extra]) == 0
        report = json.loads((run / "eval_test.json").read_text())
        assert report["tables"] == [str(run / "cases_test.csv")]
        assert f"wrote {run / 'cases_test.csv'}" in capsys.readouterr().out
        warned = [r.getMessage() for r in caplog.records if "HD95 left out" in r.getMessage()]
        assert len(warned) == (0 if spaced else 1)
        record = manifests.load(Path(shards or packed["lits"]))
        rows = read_csv(run / "cases_test.csv")
        assert tuple(rows[0]) == casetables.CASE_COLUMNS
        test_cases = record["splits"]["test"]["patient_ids"]
        assert sorted({r["case"] for r in rows}) == sorted(test_cases)
        assert len(rows) == len(test_cases) * len(LITS_REGIONS)
        assert all((r["hd95_mm"] != "") == spaced for r in rows)
        assert all(int(r["slices"]) > 0 for r in rows)
        liver = [float(r["dice"]) for r in rows if r["region"] == "liver"]
        assert np.mean(liver) == pytest.approx(report["metrics"]["dice_liver"], abs=1e-12)
        assert "hd95_liver" not in report["metrics"]  # the run's own test row has none
