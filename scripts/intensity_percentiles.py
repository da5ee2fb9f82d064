#!/usr/bin/env python3
"""Where the authors' per-volume intensity window lands in nnU-Net's normalised units.

The authors map each volume's 0.5 and 99.5 percentiles to SAM's 0 and 255. DeSAM here sees only
nnU-Net's normalised patches, so it maps a fixed window of normalised units per channel instead
(``nnunetv2_desam.networks.sam_input.intensity_windows``, read off the plans as the network
does). This script reads preprocessed cases (after ``nnUNetv2_plan_and_preprocess -c 2d``) and
prints, per case and channel, the 0.5 and 99.5 percentiles of all voxels in nnU-Net's units, the
share of voxels and of labelled voxels the window clips, and a summary per dataset; ``--window``
tries another window for every channel, ``--json`` writes the numbers.

    nnUNet_preprocessed=... python scripts/intensity_percentiles.py -d 210 211 --json percentiles.json
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunetv2_desam.networks.sam_input import intensity_windows


def case_statistics(data: np.ndarray, seg: np.ndarray, windows) -> list:
    """Per channel: percentiles 0.5 / 99.5 and the shares of voxels (all, labelled) below / above its window."""
    labelled = seg[0] > 0
    rows = []
    for channel, (low, high) in zip(data, windows):
        channel = np.asarray(channel, dtype=np.float32)
        p_low, p_high = np.percentile(channel, [0.5, 99.5])
        organ = channel[labelled]
        rows.append({
            "p0.5": float(p_low), "p99.5": float(p_high),
            "below": float(np.mean(channel < low)), "above": float(np.mean(channel > high)),
            "labelled_below": float(np.mean(organ < low)) if organ.size else 0.0,
            "labelled_above": float(np.mean(organ > high)) if organ.size else 0.0,
        })
    return rows


def dataset_statistics(dataset: str, configuration: str, plans: str, window=None) -> dict:
    name = maybe_convert_to_dataset_name(dataset)
    root = Path(os.environ["nnUNet_preprocessed"]) / name
    plans_json = json.loads((root / f"{plans}.json").read_text())
    schemes = plans_json["configurations"][configuration]["normalization_schemes"]
    windows = [window] * len(schemes) if window else intensity_windows(schemes, plans_json["foreground_intensity_properties_per_channel"])
    folder = root / f"{plans}_{configuration}"
    cases = infer_dataset_class(str(folder))(str(folder))
    statistics = {}
    for identifier in sorted(cases.identifiers):
        data, seg, _, _ = cases.load_case(identifier)
        statistics[identifier] = case_statistics(np.asarray(data), np.asarray(seg), windows)
    return {"dataset": name, "normalization": schemes, "windows": [list(w) for w in windows], "cases": statistics}


def print_table(result: dict) -> None:
    windows = ", ".join(f"[{low:.2f}, {high:.2f}]" for low, high in result["windows"])
    print(f"\n{result['dataset']} ({', '.join(result['normalization'])}); window per channel {windows}")
    print("| case | channel | p0.5 | p99.5 | voxels below / above window | labelled voxels below / above |")
    print("|---|---:|---:|---:|---:|---:|")
    for case, channels in result["cases"].items():
        for index, row in enumerate(channels):
            print(f"| {case} | {index} | {row['p0.5']:.2f} | {row['p99.5']:.2f} | {row['below']:.2%} / {row['above']:.2%} "
                  f"| {row['labelled_below']:.2%} / {row['labelled_above']:.2%} |")
    for key in ("p0.5", "p99.5"):
        values = np.array([row[key] for channels in result["cases"].values() for row in channels])
        print(f"{key}: min {values.min():.2f}, median {np.median(values):.2f}, max {values.max():.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--datasets", nargs="+", required=True, help="preprocessed dataset ids or names")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="a window for every channel instead of the one the network reads off the plans")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    window = tuple(args.window) if args.window else None
    results = [dataset_statistics(d, args.configuration, args.plans, window) for d in args.datasets]
    for result in results:
        print_table(result)
    if args.json:
        args.json.write_text(json.dumps({"datasets": results}, indent=2))


if __name__ == "__main__":
    main()
