"""Convert the multi-site prostate MRI collection into one nnU-Net v2 raw dataset per site.

DeSAM's prostate experiment (after MaxStyle/SAML) trains on one site and tests on the others,
so every site becomes its own dataset. Expected input layout::

    INPUT_ROOT/
        RUNMC/   Case00.nii.gz  Case00_segmentation.nii.gz  Case01.nii.gz  ...
        BMC/     Case00.nii.gz  Case00_Segmentation.nii.gz  ...
        I2CVB/   UCL/   BIDMC/   HK/

Site folder names match case-insensitively, and so does the segmentation suffix
(``_segmentation``, ``_Segmentation``, ``_SEGMENTATION``); ``.nii`` and ``.nii.gz`` are both read.
Other files are ignored. Every image needs a segmentation and vice versa.

Site ``i`` in the fixed order RUNMC, BMC, I2CVB, UCL, BIDMC, HK becomes dataset ``d + i``
(``Dataset{d+i}_Prostate{SITE}``) whichever sites are present, so a site's id never depends on
which others were converted. Case identifiers are ``{SITE}_{stem}``, e.g. ``RUNMC_Case00``.

Labels are binary (background 0, prostate 1). The sites store the prostate as 1, 2 or 255, some
as float; a label whose values are 0 and one positive value ``v`` becomes 0/1. Several foreground
values (or partial-volume values left by resampling) are refused rather than guessed at.
"""
from __future__ import annotations

import argparse
import sys
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.experiments.raw_dataset import (ConversionError, ConversionResult, DatasetSpec, Log,
                                                    SourceCase, convert_datasets, dataset_folder_name,
                                                    format_values, nifti_stem, resolve_raw_folder,
                                                    run_converter)

PROG = "nnUNetv2_desam_convert_prostate"
PROSTATE_SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
PROSTATE_LABELS = {"background": 0, "prostate": 1}
CHANNEL_NAMES = {"0": "T2"}
_SEGMENTATION = re.compile(r"(.+)_segmentation", flags=re.IGNORECASE)


@dataclass(frozen=True)
class BinaryLabel:
    """Background 0 stays 0; the single positive foreground value, whatever it is, becomes 1.

    A label without any foreground passes (nnU-Net handles empty cases); one without background
    does not, as no prostate fills a whole volume.
    """

    def __call__(self, array: np.ndarray) -> np.ndarray:
        values = np.unique(array)
        foreground = values[values != 0]
        if 0 not in values or len(foreground) > 1 or not np.all(foreground > 0):
            raise ConversionError(f"unknown label values {format_values(values.tolist())}; expected "
                                  f"background 0 and one positive prostate value")
        return (array != 0).astype(np.uint8)

    def describe(self) -> dict:
        return {"binary": "0 -> 0, the one positive value -> 1"}


def prostate_dataset_id(site: str, first_id: int) -> int:
    """The id of ``site``'s dataset when RUNMC gets ``first_id``."""
    return first_id + PROSTATE_SITES.index(site)


def prostate_dataset_name(site: str, first_id: int) -> str:
    """The nnU-Net folder name of ``site``'s dataset, e.g. ``Dataset201_ProstateRUNMC``."""
    return dataset_folder_name(prostate_dataset_id(site, first_id), f"Prostate{site}")


def prostate_spec(site: str, first_id: int) -> DatasetSpec:
    """The dataset a site becomes: binary labels, one T2 channel."""
    return DatasetSpec(
        dataset_id=prostate_dataset_id(site, first_id),
        name=f"Prostate{site}",
        channel_names=CHANNEL_NAMES,
        labels=PROSTATE_LABELS,
        label_rule=BinaryLabel(),
        dataset_json_extras={
            "description": f"Prostate T2 MRI, site {site} of the multi-site prostate collection",
            "reference": "Liu et al., SAML (MICCAI 2020); sources: NCI-ISBI 2013, I2CVB, PROMISE12",
            "license": "see the original sources (NCI-ISBI 2013, I2CVB, PROMISE12)",
            "converted_by": PROG,
        },
    )


def find_site_folders(input_root: Path, sites: Sequence[str] | None = None) -> dict[str, Path]:
    """Site name -> folder, in the fixed site order; ``sites`` restricts (and requires) sites."""
    if not input_root.is_dir():
        raise ConversionError(f"input folder {input_root} does not exist")
    found: dict[str, Path] = {}
    for folder in sorted(p for p in input_root.iterdir() if p.is_dir()):
        site = folder.name.upper()
        if site in PROSTATE_SITES:
            if site in found:
                raise ConversionError(f"two folders for site {site}: {found[site]} and {folder}")
            found[site] = folder
    wanted = [s.upper() for s in sites] if sites else list(found)
    missing = [s for s in wanted if s not in found]
    if missing:
        raise ConversionError(f"no folder for site(s) {', '.join(missing)} in {input_root}")
    if not wanted:
        raise ConversionError(f"no site folders ({', '.join(PROSTATE_SITES)}) in {input_root}")
    return {s: found[s] for s in PROSTATE_SITES if s in wanted}


def find_site_cases(site: str, folder: Path) -> list[SourceCase]:
    """Pair each ``<stem>.nii[.gz]`` with its ``<stem>_segmentation.nii[.gz]`` (any case)."""
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path.name)
        if stem is None or not path.is_file():
            continue
        match = _SEGMENTATION.fullmatch(stem)
        key, found = (match.group(1), labels) if match else (stem, images)
        if key in found:
            raise ConversionError(f"{site}_{key}: two files for one case in {folder}: "
                                  f"{found[key].name} and {path.name}")
        found[key] = path
    if not images and not labels:
        raise ConversionError(f"site folder {folder} holds no NIfTI files")
    without_label = sorted(images.keys() - labels.keys())
    if without_label:
        stem = without_label[0]
        raise ConversionError(f"{site}_{stem} ({folder.name}/{images[stem].name}): missing label "
                              f"(expected {stem}_segmentation.nii.gz next to it)")
    without_image = sorted(labels.keys() - images.keys())
    if without_image:
        stem = without_image[0]
        raise ConversionError(f"{site}_{stem} ({folder.name}/{labels[stem].name}): label without image "
                              f"(expected {stem}.nii.gz next to it)")
    return [SourceCase(f"{site}_{stem}", images[stem], labels[stem], f"{folder.name}/{images[stem].name}")
            for stem in sorted(images)]


def convert_prostate(input_root: Path, first_id: int, raw_folder: Path, sites: Sequence[str] | None = None,
                     overwrite: bool = False, log: Log = print) -> list[ConversionResult]:
    """Convert every present (or every requested) site into its own raw dataset."""
    input_root = Path(input_root)
    jobs = [(prostate_spec(site, first_id), find_site_cases(site, folder))
            for site, folder in find_site_folders(input_root, sites).items()]
    return convert_datasets(jobs, input_root, Path(raw_folder), overwrite, log)


def build_parser() -> argparse.ArgumentParser:
    sites_table = "\n".join(f"  {site:<6} -> Dataset{{d+{i}}}_Prostate{site}" for i, site in enumerate(PROSTATE_SITES))
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert the multi-site prostate MRI collection (RUNMC, BMC, I2CVB, UCL, BIDMC, HK)\n"
                    "into one nnU-Net v2 raw dataset per site. Each site folder (any case) holds\n"
                    "CaseNN.nii[.gz] + CaseNN_segmentation.nii[.gz] (suffix in any case).",
        epilog=f"dataset ids (fixed, whichever sites are present):\n{sites_table}\n\n"
               "Labels become background 0 / prostate 1: a site's single foreground value (1, 2,\n"
               "255, float) maps to 1. Rerunning on the same input does nothing; an existing\n"
               "different dataset is only replaced with --overwrite.\n\n"
               f"example:\n  {PROG} -i /data/prostate_multisite -d 201",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, type=Path, metavar="INPUT_ROOT",
                        help="folder holding the site folders")
    parser.add_argument("-d", "--dataset-id", required=True, type=positive_int_argument, metavar="DATASET_ID",
                        help="id of the RUNMC dataset; the other sites follow consecutively (see below)")
    parser.add_argument("--raw", metavar="NNUNET_RAW",
                        help="output nnUNet_raw folder (default: the nnUNet_raw environment variable)")
    parser.add_argument("--sites", nargs="+", type=str.upper, choices=PROSTATE_SITES, metavar="SITE",
                        help=f"convert only these sites (any of {', '.join(PROSTATE_SITES)}; default: all present)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing dataset folders that hold a different conversion")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(run_converter(PROG, lambda: convert_prostate(args.input, args.dataset_id, resolve_raw_folder(args.raw),
                                                 args.sites, args.overwrite)))


if __name__ == "__main__":
    main()
