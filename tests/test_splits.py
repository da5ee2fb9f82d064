"""The source-domain 9:1 split and its splits_final.json."""
import json
import random

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_desam.experiments import convert_prostate
from nnunetv2_desam.experiments.splits import (SPLITS_FILE, SplitError, case_identifiers, compute_source_split,
                                               write_source_split)

CASES = [f"RUNMC_Case{i:02d}" for i in range(30)]


@pytest.fixture(autouse=True)
def nnunet_env(tmp_path, monkeypatch):
    """Point nnU-Net's folders into tmp_path, so no test sees (or writes) real datasets."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    return tmp_path


def preprocessed_dataset(root, name="Dataset201_ProstateRUNMC", cases=CASES):
    """A preprocessed dataset folder as nnUNetv2_plan_and_preprocess leaves it (the parts we read)."""
    folder = root / "nnUNet_preprocessed" / name
    (folder / "gt_segmentations").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for case in cases:
        (folder / "gt_segmentations" / f"{case}.nii.gz").touch()
    return folder


@pytest.mark.parametrize("num_cases, num_val", [(2, 1), (3, 1), (10, 1), (12, 1), (30, 3), (116, 12)])
def test_split_sizes(num_cases, num_val):
    split = compute_source_split(f"case{i:03d}" for i in range(num_cases))
    assert len(split["val"]) == num_val
    assert len(split["train"]) == num_cases - num_val


def test_split_partitions_the_cases():
    split = compute_source_split(CASES)
    assert set(split["train"]).isdisjoint(split["val"])
    assert sorted(split["train"] + split["val"]) == CASES
    assert split["train"] == sorted(split["train"]) and split["val"] == sorted(split["val"])


def test_split_is_pinned():
    """Changing the algorithm would silently change every published split: pin one."""
    assert compute_source_split(CASES)["val"] == ["RUNMC_Case01", "RUNMC_Case02", "RUNMC_Case05"]


def test_split_is_seeded_and_ignores_input_order():
    shuffled = CASES.copy()
    random.Random(0).shuffle(shuffled)
    assert compute_source_split(shuffled, seed=7) == compute_source_split(CASES, seed=7)
    assert compute_source_split(CASES, seed=7) != compute_source_split(CASES, seed=8)


def test_split_train_fraction():
    assert len(compute_source_split(CASES, train_fraction=0.5)["val"]) == 15


@pytest.mark.parametrize("cases, fraction, message", [
    ([], 0.9, "need at least 2 cases to split into training and validation, got 0"),
    (["only"], 0.9, "need at least 2 cases to split into training and validation, got 1"),
    (["a", "b", "a"], 0.9, "duplicate case identifiers: ['a']"),
    (CASES, 1.0, "train_fraction must be between 0 and 1"),
])
def test_split_refuses(cases, fraction, message):
    with pytest.raises(SplitError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compute_source_split(cases, train_fraction=fraction)


def test_write_from_preprocessed_folder(nnunet_env):
    folder = preprocessed_dataset(nnunet_env)
    messages = []
    path = write_source_split(folder, seed=3, log=messages.append)
    assert path == folder / SPLITS_FILE
    splits = json.loads(path.read_text())
    assert splits == [compute_source_split(CASES, seed=3)]
    assert messages == [f"{path}: 27 training, 3 validation cases (seed 3)"]


@pytest.mark.parametrize("dataset", ["Dataset201_ProstateRUNMC", 201, "201"])
def test_write_by_dataset_name_or_id(nnunet_env, dataset):
    folder = preprocessed_dataset(nnunet_env)
    assert write_source_split(dataset, log=lambda _: None) == folder / SPLITS_FILE


def test_identical_split_is_a_no_op(nnunet_env):
    path = write_source_split(preprocessed_dataset(nnunet_env), log=lambda _: None)
    mtime = path.stat().st_mtime_ns
    messages = []
    write_source_split(path.parent, log=messages.append)
    assert path.stat().st_mtime_ns == mtime
    assert messages == [f"{path} already holds this split; unchanged"]


def test_different_split_needs_overwrite(nnunet_env):
    path = write_source_split(preprocessed_dataset(nnunet_env), seed=1, log=lambda _: None)
    original = path.read_text()
    with pytest.raises(SplitError, match="already exists with a different split; pass overwrite=True"):
        write_source_split(path.parent, seed=2, log=lambda _: None)
    assert path.read_text() == original
    write_source_split(path.parent, seed=2, overwrite=True, log=lambda _: None)
    assert json.loads(path.read_text()) == [compute_source_split(CASES, seed=2)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["dataset.json", "gt_segmentations", SPLITS_FILE]


def test_fewer_than_two_cases_writes_nothing(nnunet_env):
    folder = preprocessed_dataset(nnunet_env, cases=["RUNMC_Case00"])
    with pytest.raises(SplitError, match="need at least 2 cases"):
        write_source_split(folder)
    assert not (folder / SPLITS_FILE).exists()


def test_no_cases_anywhere(nnunet_env):
    with pytest.raises(SplitError, match="no cases found for Dataset201_ProstateRUNMC"):
        write_source_split(nnunet_env / "nnUNet_preprocessed" / "Dataset201_ProstateRUNMC")


def test_unknown_dataset_id(nnunet_env):
    with pytest.raises(SplitError, match="Could not find a dataset with the ID 999"):
        write_source_split(999)


def test_before_preprocessing_uses_the_converted_raw_dataset(tmp_path, nnunet_env):
    site = tmp_path / "prostate" / "RUNMC"
    site.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.zeros((2, 4, 4), np.float32))
    for k in range(4):
        sitk.WriteImage(image, str(site / f"Case{k:02d}.nii.gz"))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8), str(site / f"Case{k:02d}_segmentation.nii.gz"))
    convert_prostate.convert_prostate(site.parent, 201, nnunet_env / "nnUNet_raw", log=lambda _: None)
    preprocessed = nnunet_env / "nnUNet_preprocessed" / "Dataset201_ProstateRUNMC"
    assert case_identifiers(preprocessed) == [f"RUNMC_Case{k:02d}" for k in range(4)]
    path = write_source_split("Dataset201_ProstateRUNMC", log=lambda _: None)
    assert path == preprocessed / SPLITS_FILE
    split = json.loads(path.read_text())[0]
    assert len(split["train"]) == 3 and len(split["val"]) == 1
