#!/usr/bin/env python3
"""How balanced are the IoU targets DeSAM-P's training points give on a dataset? nnU-Net's own loader, measured.

Draws batches from ``nnUNetTrainerDeSAM``'s training loader (nnU-Net's patch sampling, foreground oversampling and
augmentation, fold 0 of the dataset's split) and the training points of
:func:`~nnunetv2_desam.networks.prompts.sample_training_points` for each. Prints the share of patches without
foreground, how often each IoU output is supervised and its share of positives (points inside the class). The gate
passes a prompt where its IoU output exceeds 0.5; an output trained on a positive share well under 1:1 predicts
under 0.5 wherever it is unsure. The last line gives the share the sampler before commit 8ca3e46 gave, which also
made every patch without foreground a negative for one class drawn uniformly.

    nnUNet_n_proc_DA=0 python scripts/iou_target_balance.py -d 210 -p nnUNetPlans_3mm --batch-size 4 --batches 150

(``nnUNet_n_proc_DA=0``: the loader runs in this process, under the script's seeds, so the draw repeats.)
"""

import argparse
import json
import os
import random
import tempfile
from unittest import mock

import numpy as np
import torch
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunetv2_desam.environment_variables import positive_int_argument
from nnunetv2_desam.networks.prompts import sample_training_points
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM


def training_loader(dataset: str, plans_name: str, configuration: str, batch_size: int):
    """nnUNetTrainerDeSAM's training loader for fold 0 (the trainer's network is never built; call it with
    nnU-Net's results folder pointed elsewhere, or the trainer leaves a log file in the real model folder)."""
    folder = os.path.join(os.environ["nnUNet_preprocessed"], maybe_convert_to_dataset_name(dataset))
    with open(os.path.join(folder, f"{plans_name}.json")) as file:
        plans = {**json.load(file), "continue_training": False}
    with open(os.path.join(folder, "dataset.json")) as file:
        dataset_json = json.load(file)
    trainer = nnUNetTrainerDeSAM(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
    trainer.batch_size = batch_size
    loader, _ = trainer.get_dataloaders()
    return loader, trainer.label_manager.num_segmentation_heads - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (preprocessed, with a split)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("--batch-size", type=positive_int_argument, default=4)
    parser.add_argument("--batches", type=positive_int_argument, default=150)
    args = parser.parse_args()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch, mock.patch.dict(os.environ, {"nnUNet_results": scratch}):
        loader, num_classes = training_loader(args.dataset, args.plans, args.configuration, args.batch_size)
        generator = torch.Generator().manual_seed(0)
        supervised, positives, empty, samples = torch.zeros(num_classes), torch.zeros(num_classes), 0, 0
        for _ in range(args.batches):
            target = next(loader)["target"]
            target = target[0] if isinstance(target, list) else target
            prompts = sample_training_points(target, num_classes, generator)
            supervised += prompts.supervised.sum(0)
            positives += (prompts.supervised * prompts.iou_target).sum(0)
            empty += int((~(target.flatten(1) > 0).any(1)).sum())
            samples += len(target)
    print(f"{samples} training patches of {args.dataset} ({args.plans}, {args.configuration}, batch {args.batch_size}): "
          f"{empty} without foreground ({empty / samples:.3f})")
    print("share of patches supervising each IoU output:", np.round((supervised / samples).tolist(), 3))
    print("positive share of each IoU output:", np.round((positives / supervised).tolist(), 3))
    print("... with patches without foreground as negatives (before 8ca3e46):",
          np.round((positives / (supervised + empty / num_classes)).tolist(), 3))


if __name__ == "__main__":
    main()
