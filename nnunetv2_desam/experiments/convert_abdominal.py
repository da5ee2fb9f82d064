"""Convert the cross-modality abdominal release (SSL-ALPNet / CSDG) into two nnU-Net v2 raw datasets.

DeSAM's abdominal experiment trains on one modality and tests on the other, on the four organs
both label sets share. Expected input layout (as released, preprocessed)::

    INPUT_ROOT/
        SABS/sabs_CT_normalized/        image_0.nii.gz  label_0.nii.gz  image_1.nii.gz ...
        CHAOST2/chaos_MR_T2_normalized/ image_1.nii.gz  label_1.nii.gz  image_2.nii.gz ...

``image_k`` pairs with ``label_k``; other files are ignored. Case identifiers keep ``k``:
``CT_005``, ``MR_001``. Output: ``Dataset{ct_id}_AbdomenCT`` and ``Dataset{mr_id}_AbdomenMR``
(by default ``mr_id = ct_id + 1``), both labelled background 0, liver 1, right kidney 2,
left kidney 3, spleen 4:

* CT (13 BTCV classes: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus,
  6 liver, 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic vein, 11 pancreas, 12 right adrenal,
  13 left adrenal): 6 -> 1, 2 -> 2, 3 -> 3, 1 -> 4, every other class -> 0.
* MR (CHAOS T2-SPIR: 1 liver, 2 right kidney, 3 left kidney, 4 spleen): kept as is.

The CT channel is deliberately named ``CTnorm``, not ``CT``. nnU-Net chooses its intensity
normalisation by channel name, and ``CT`` selects CTNormalization: clipping to percentiles of
the dataset-wide foreground intensities and normalising with their global mean and std, which
is built for Hounsfield units. This release is no longer in Hounsfield units (it was clipped and
rescaled to 0-255), and for cross-modality generalisation both domains should be normalised
the same way: any name other than ``CT`` gives nnU-Net's default per-case z-score, which is
what the MR dataset gets.
"""
from __future__ import annotations

import argparse
import sys
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.experiments.raw_dataset import (ConversionError, ConversionResult, DatasetSpec, LabelMapping,
                                                    Log, SourceCase, convert_datasets, dataset_folder_name,
                                                    resolve_raw_folder, run_converter)

PROG = "nnUNetv2_desam_convert_abdominal"
ABDOMINAL_LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
CT_CHANNEL_NAME = "CTnorm"
MR_CHANNEL_NAME = "MRI"
CT_LABEL_MAPPING = LabelMapping({0: 0, 1: 4, 2: 2, 3: 3, 4: 0, 5: 0, 6: 1, 7: 0, 8: 0, 9: 0, 10: 0, 11: 0,
                                 12: 0, 13: 0})
MR_LABEL_MAPPING = LabelMapping({0: 0, 1: 1, 2: 2, 3: 3, 4: 4})
_CASE_FILE = re.compile(r"(image|label)_(\d+)\.nii\.gz")


@dataclass(frozen=True)
class Modality:
    """Where one modality lives in the release and what its dataset looks like."""

    key: str
    case_prefix: str
    subfolder: str
    dataset_name: str
    channel_name: str
    label_mapping: LabelMapping
    description: str
    reference: str
    license: str


MODALITIES = {
    "ct": Modality("ct", "CT", "SABS/sabs_CT_normalized", "AbdomenCT", CT_CHANNEL_NAME, CT_LABEL_MAPPING,
                   "Abdominal CT (BTCV / Synapse multi-atlas), SSL-ALPNet preprocessing, 0-255; "
                   "liver, kidneys and spleen of the 13 BTCV classes",
                   "Landman et al., MICCAI 2015 multi-atlas labeling beyond the cranial vault; "
                   "Ouyang et al., SSL-ALPNet (ECCV 2020)",
                   "Synapse / BTCV terms of use (research only)"),
    "mr": Modality("mr", "MR", "CHAOST2/chaos_MR_T2_normalized", "AbdomenMR", MR_CHANNEL_NAME, MR_LABEL_MAPPING,
                   "Abdominal MRI T2-SPIR (CHAOS), SSL-ALPNet preprocessing",
                   "Kavur et al., CHAOS challenge (Medical Image Analysis 2021); "
                   "Ouyang et al., SSL-ALPNet (ECCV 2020)",
                   "CC BY-SA 4.0"),
}


def abdominal_dataset_name(modality: str, dataset_id: int) -> str:
    """The nnU-Net folder name of a modality's dataset, e.g. ``Dataset203_AbdomenCT``."""
    return dataset_folder_name(dataset_id, MODALITIES[modality].dataset_name)


def abdominal_spec(modality: Modality, dataset_id: int) -> DatasetSpec:
    """The dataset a modality becomes: the four shared organs, one channel."""
    return DatasetSpec(
        dataset_id=dataset_id,
        name=modality.dataset_name,
        channel_names={"0": modality.channel_name},
        labels=ABDOMINAL_LABELS,
        label_rule=modality.label_mapping,
        dataset_json_extras={"description": modality.description, "reference": modality.reference,
                             "license": modality.license, "converted_by": PROG},
    )


def find_modality_cases(modality: Modality, input_root: Path) -> list[SourceCase]:
    """Pair ``image_k.nii.gz`` with ``label_k.nii.gz`` in the modality's folder, ordered by k."""
    folder = input_root / modality.subfolder
    if not folder.is_dir():
        raise ConversionError(f"no {modality.key.upper()} folder: expected {folder} "
                              f"(use --modalities to convert only the other modality)")
    files: dict[str, dict[int, Path]] = {"image": {}, "label": {}}
    for path in folder.iterdir():
        match = _CASE_FILE.fullmatch(path.name)
        if match and path.is_file():
            files[match.group(1)][int(match.group(2))] = path
    images, labels = files["image"], files["label"]
    if not images and not labels:
        raise ConversionError(f"{folder} holds no image_k.nii.gz / label_k.nii.gz files")
    unpaired = sorted(images.keys() ^ labels.keys())
    if unpaired:
        k = unpaired[0]
        have, want = ("image", "label") if k in images else ("label", "image")
        raise ConversionError(f"{_case_id(modality, k)} ({have}_{k}): missing {want} "
                              f"(expected {want}_{k}.nii.gz in {folder})")
    return [SourceCase(_case_id(modality, k), images[k], labels[k], f"image_{k}") for k in sorted(images)]


def _case_id(modality: Modality, k: int) -> str:
    return f"{modality.case_prefix}_{k:03d}"


def abdominal_dataset_ids(first_id: int) -> dict[str, int]:
    """The default ids: CT gets ``first_id``, MR ``first_id + 1``."""
    return {"ct": first_id, "mr": first_id + 1}


def convert_abdominal(input_root: Path, raw_folder: Path, dataset_ids: Mapping[str, int],
                      overwrite: bool = False, log: Log = print) -> list[ConversionResult]:
    """Convert the modalities named in ``dataset_ids`` ("ct", "mr" -> dataset id)."""
    input_root = Path(input_root)
    if not input_root.is_dir():
        raise ConversionError(f"input folder {input_root} does not exist")
    if len(set(dataset_ids.values())) < len(dataset_ids):
        raise ConversionError(f"CT and MR datasets need different ids, got {dict(dataset_ids)}")
    jobs = [(abdominal_spec(MODALITIES[m], dataset_ids[m]), find_modality_cases(MODALITIES[m], input_root))
            for m in MODALITIES if m in dataset_ids]
    return convert_datasets(jobs, input_root, Path(raw_folder), overwrite, log)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert the SSL-ALPNet / CSDG abdominal release (SABS CT + CHAOS T2 MRI) into two\n"
                    "nnU-Net v2 raw datasets with the four shared organs: background 0, liver 1,\n"
                    "right kidney 2, left kidney 3, spleen 4.",
        epilog="input layout:\n"
               "  INPUT_ROOT/SABS/sabs_CT_normalized/image_k.nii.gz, label_k.nii.gz\n"
               "  INPUT_ROOT/CHAOST2/chaos_MR_T2_normalized/image_k.nii.gz, label_k.nii.gz\n\n"
               "CT labels (13 BTCV classes) map 6 liver -> 1, 2 right kidney -> 2, 3 left kidney -> 3,\n"
               "1 spleen -> 4, all other classes -> 0. MR labels are kept.\n\n"
               f"The CT channel is named '{CT_CHANNEL_NAME}', not 'CT', on purpose: the name 'CT' makes\n"
               "nnU-Net use CTNormalization (dataset-wide percentile clipping and mean/std), which\n"
               "is built for Hounsfield units. This CT is already clipped and rescaled to 0-255, and\n"
               "both domains should be normalised alike, so it gets nnU-Net's default per-case\n"
               "z-score, like the MR dataset.\n\n"
               "Rerunning on the same input does nothing; an existing different dataset is only\n"
               "replaced with --overwrite.\n\n"
               f"example:\n  {PROG} -i /data/abdominal -d 210   # Dataset210_AbdomenCT, Dataset211_AbdomenMR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, type=Path, metavar="INPUT_ROOT",
                        help="folder holding SABS/ and CHAOST2/")
    ids = parser.add_argument_group("dataset ids (give -d, or --ct-id and --mr-id for the modalities converted)")
    ids.add_argument("-d", "--dataset-id", type=positive_int_argument, metavar="DATASET_ID",
                     help="id of the CT dataset; the MR dataset gets DATASET_ID + 1")
    ids.add_argument("--ct-id", type=positive_int_argument, help="id of the CT dataset (overrides -d)")
    ids.add_argument("--mr-id", type=positive_int_argument, help="id of the MR dataset (overrides -d + 1)")
    parser.add_argument("--raw", metavar="NNUNET_RAW",
                        help="output nnUNet_raw folder (default: the nnUNet_raw environment variable)")
    parser.add_argument("--modalities", nargs="+", type=str.lower, choices=tuple(MODALITIES),
                        default=list(MODALITIES), help="convert only these modalities (default: ct mr)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing dataset folders that hold a different conversion")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = abdominal_dataset_ids(args.dataset_id) if args.dataset_id is not None else {}
    explicit = {"ct": args.ct_id, "mr": args.mr_id}
    dataset_ids = {m: explicit[m] if explicit[m] is not None else defaults.get(m) for m in args.modalities}
    without_id = [m for m, dataset_id in dataset_ids.items() if dataset_id is None]
    if without_id:
        parser.error(f"no dataset id for {', '.join(without_id)}: give -d DATASET_ID or --ct-id/--mr-id")
    sys.exit(run_converter(PROG, lambda: convert_abdominal(args.input, resolve_raw_folder(args.raw), dataset_ids,
                                                  args.overwrite)))


if __name__ == "__main__":
    main()
