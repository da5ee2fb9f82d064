"""The source-domain split of DeSAM's protocol, written as nnU-Net's ``splits_final.json``.

The source domain is split 9:1 into training and in-domain validation; the target domains are
only ever tested on. nnU-Net reads the split from ``nnUNet_preprocessed/DatasetXXX_Name/
splits_final.json`` (a list of folds, each ``{"train": [...], "val": [...]}``), so training with
fold 0 uses exactly this split. Without the file nnU-Net would make its own 5-fold split
(80:20), which is not the paper's protocol.

Case identifiers come from ``gt_segmentations/`` of the preprocessed dataset (nnU-Net copies
every training label there during ``nnUNetv2_plan_and_preprocess``) or, before preprocessing,
from ``imagesTr/`` of the raw dataset of the same name. The split is a seeded permutation of
the sorted identifiers, so it depends only on the set of cases and the seed.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

from nnunetv2_desam.errors import SplitError

SPLITS_FILE = "splits_final.json"
DEFAULT_SEED = 12345
"""nnU-Net's own split seed."""
DEFAULT_TRAIN_FRACTION = 0.9


def compute_source_split(identifiers: Iterable[str], seed: int = DEFAULT_SEED,
                         train_fraction: float = DEFAULT_TRAIN_FRACTION) -> dict[str, list[str]]:
    """Split case identifiers into ``{"train": [...], "val": [...]}`` (each sorted).

    ``round(n * train_fraction)`` cases train, clamped so that train and val each get at least
    one case. Input order does not matter: the identifiers are sorted before the seeded
    permutation (numpy's legacy RandomState, whose stream numpy keeps stable across versions).
    """
    cases = sorted(identifiers)
    duplicates = sorted(case for case, count in Counter(cases).items() if count > 1)
    if duplicates:
        raise SplitError(f"duplicate case identifiers: {duplicates}")
    if len(cases) < 2:
        raise SplitError(f"need at least 2 cases to split into training and validation, got {len(cases)}")
    if not 0 < train_fraction < 1:
        raise SplitError(f"train_fraction must be between 0 and 1 (exclusive), got {train_fraction}")
    num_train = min(max(round(len(cases) * train_fraction), 1), len(cases) - 1)
    order = np.random.RandomState(seed).permutation(len(cases))
    return {"train": sorted(cases[i] for i in order[:num_train]),
            "val": sorted(cases[i] for i in order[num_train:])}


def preprocessed_dataset_folder(dataset: str | int | os.PathLike) -> Path:
    """``nnUNet_preprocessed/DatasetXXX_Name`` for a dataset id or name; a path is taken as is.

    A ``str`` is a dataset name if it starts with "Dataset" and holds no path separator, an id
    if it is all digits, and otherwise a path.
    """
    if isinstance(dataset, os.PathLike):
        return Path(dataset)
    is_name = isinstance(dataset, str) and dataset.startswith("Dataset") and os.sep not in dataset
    is_id = isinstance(dataset, int) or (isinstance(dataset, str) and dataset.isdigit())
    if not (is_name or is_id):
        return Path(dataset)
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise SplitError(f"cannot locate dataset {dataset}: the nnUNet_preprocessed environment variable is not set")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise SplitError(str(error).splitlines()[0]) from None
    return Path(preprocessed) / name


def case_identifiers(preprocessed_folder: Path) -> list[str]:
    """The training cases of a dataset: preprocessed ``gt_segmentations/``, else raw ``imagesTr/``."""
    ground_truth = preprocessed_folder / "gt_segmentations"
    if ground_truth.is_dir():
        file_ending = _file_ending(preprocessed_folder / "dataset.json")
        return sorted(p.name[:-len(file_ending)] for p in ground_truth.iterdir() if p.name.endswith(file_ending))
    raw = os.environ.get("nnUNet_raw")
    raw_folder = Path(raw) / preprocessed_folder.name if raw else None
    if raw_folder is None or not (raw_folder / "imagesTr").is_dir():
        raise SplitError(f"no cases found for {preprocessed_folder.name}: neither {ground_truth} nor "
                         f"nnUNet_raw/{preprocessed_folder.name}/imagesTr exists")
    file_ending = _file_ending(raw_folder / "dataset.json")
    return sorted(get_identifiers_from_splitted_dataset_folder(str(raw_folder / "imagesTr"), file_ending))


def _file_ending(dataset_json: Path) -> str:
    try:
        return json.loads(dataset_json.read_text())["file_ending"]
    except (OSError, ValueError, KeyError):
        raise SplitError(f"cannot read file_ending from {dataset_json}") from None


def write_source_split(dataset: str | int | os.PathLike, seed: int = DEFAULT_SEED,
                       train_fraction: float = DEFAULT_TRAIN_FRACTION, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> Path:
    """Write the source split of ``dataset`` (id, name or preprocessed folder) as fold 0 of
    ``splits_final.json`` and return that file's path.

    An identical existing file is left untouched. A different one is refused unless
    ``overwrite``: a trained model's validation scores are only meaningful with the split it
    was trained on, so silently replacing a split would invalidate them.
    """
    folder = preprocessed_dataset_folder(dataset)
    identifiers = case_identifiers(folder)
    splits = [compute_source_split(identifiers, seed, train_fraction)]
    path = folder / SPLITS_FILE
    if path.exists():
        if holds_source_split(path, identifiers, seed, train_fraction):
            log(f"{path} already holds this split; unchanged")
            return path
        if not overwrite:
            raise SplitError(f"{path} already exists with a different split; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{SPLITS_FILE}.partial")
    partial.write_text(json.dumps(splits, indent=4))
    partial.replace(path)
    log(f"{path}: {len(splits[0]['train'])} training, {len(splits[0]['val'])} validation cases (seed {seed})")
    return path


def holds_source_split(path: Path, identifiers: Iterable[str], seed: int = DEFAULT_SEED,
                       train_fraction: float = DEFAULT_TRAIN_FRACTION) -> bool:
    """Whether the ``splits_final.json`` at ``path`` exists and holds exactly this source split as its one fold."""
    try:
        return json.loads(path.read_text()) == [compute_source_split(identifiers, seed, train_fraction)]
    except (OSError, ValueError):
        return False
