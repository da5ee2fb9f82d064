"""The datasets of an experiment: nnU-Net raw datasets, found by id or name and checked before anything
runs (targets share the source's labels, file ending and channels; every dataset trained on splits 9:1)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets, maybe_convert_to_dataset_name
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

from nnunetv2_desam.errors import ExperimentError
from nnunetv2_desam.experiments.splits import SplitError, compute_source_split


@dataclass(frozen=True)
class Dataset:
    """An nnU-Net raw dataset as the experiment uses it: cases of ``imagesTr`` with their ``labelsTr``."""

    name: str
    folder: Path
    labels: dict[str, int]
    file_ending: str
    num_channels: int
    cases: tuple[str, ...]

    @property
    def dataset_id(self) -> int:
        return int(self.name[len("Dataset"):].split("_", 1)[0])

    def image(self, case: str) -> Path:
        return self.folder / "imagesTr" / f"{case}_0000{self.file_ending}"

    def ground_truth(self, case: str) -> Path:
        return self.folder / "labelsTr" / f"{case}{self.file_ending}"


def dataset_name(name_or_id: str, raw: Path) -> str:
    """``DatasetXXX_Name`` of an id or name, by nnU-Net's own lookup (which reads its folders from os.environ),
    so that an id nnU-Net's commands would find ambiguous is refused here, before anything runs."""
    if not (name_or_id.isdigit() or (name_or_id.startswith("Dataset") and "/" not in name_or_id)):
        raise ExperimentError(f"dataset {name_or_id!r}: give an id (e.g. 901) or a name (e.g. Dataset901_SiteA)")
    try:
        return maybe_convert_to_dataset_name(name_or_id)
    except RuntimeError:
        candidates = find_candidate_datasets(int(name_or_id))
        if len(candidates) > 1:
            raise ExperimentError(f"dataset id {name_or_id} is ambiguous in nnU-Net's folders: "
                                  f"{', '.join(candidates)}") from None
        raise ExperimentError(f"unknown dataset {name_or_id!r}: no such dataset folder in nnUNet_raw ({raw})") from None


def resolve_dataset(name_or_id: str, raw: Path) -> Dataset:
    """The raw dataset ``DatasetXXX_Name`` (given as id or name) with its labels and cases."""
    folder = raw / dataset_name(name_or_id, raw)
    if not folder.is_dir():
        raise ExperimentError(f"unknown dataset {name_or_id!r}: no such dataset folder in nnUNet_raw ({raw})")
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
        labels, file_ending = dataset_json["labels"], dataset_json["file_ending"]
        num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality")))
    except (OSError, ValueError, KeyError, TypeError):
        raise ExperimentError(f"{folder / 'dataset.json'} is missing or lacks labels, file_ending or channel_names") from None
    if not all(isinstance(value, int) for value in labels.values()) or "ignore" in labels:
        raise ExperimentError(f"{folder.name}: only plain integer labels are supported (no regions, no ignore label)")
    if not (folder / "imagesTr").is_dir():
        raise ExperimentError(f"{folder.name} has no imagesTr folder")
    cases = sorted(get_identifiers_from_splitted_dataset_folder(str(folder / "imagesTr"), file_ending))
    unlabelled = [case for case in cases if not (folder / "labelsTr" / f"{case}{file_ending}").is_file()]
    if not cases or unlabelled:
        raise ExperimentError(f"{folder.name}: " + (f"cases without a label in labelsTr: {', '.join(unlabelled[:5])}"
                                                     if unlabelled else "no cases in imagesTr"))
    return Dataset(folder.name, folder, labels, file_ending, num_channels, tuple(cases))


def check_targets(source: Dataset, targets: Sequence[Dataset]) -> None:
    """A source model can only be scored on targets with its labels, file ending and number of channels."""
    names = [target.name for target in targets]
    if source.name in names:
        raise ExperimentError(f"{source.name} is the source; a target must be another domain")
    if len(set(names)) < len(names):
        raise ExperimentError(f"a target is listed twice: {', '.join(names)}")
    for target in targets:
        if target.labels != source.labels:
            raise ExperimentError(f"labels of target {target.name} {target.labels} differ from those of source "
                                  f"{source.name} {source.labels}; targets need the same label names and values")
        if target.file_ending != source.file_ending:
            raise ExperimentError(f"target {target.name} uses {target.file_ending} files, source {source.name} "
                                  f"{source.file_ending}; convert them to one file ending")
        if target.num_channels != source.num_channels:
            raise ExperimentError(f"target {target.name} has {target.num_channels} channel(s), source {source.name} "
                                  f"{source.num_channels}")


def check_splittable(datasets: Sequence[Dataset], seed: int) -> None:
    """Every dataset that is trained on needs its 9:1 split (at least two cases)."""
    for dataset in datasets:
        try:
            compute_source_split(dataset.cases, seed)
        except SplitError as error:
            raise ExperimentError(f"{dataset.name}: {error}") from None
