"""A small synthetic nnU-Net workspace shared by the tests that drive nnU-Net (the fixture is in conftest.py)."""

import json
import os
from pathlib import Path
from unittest import mock

from nnunetv2_desam.experiments.splits import write_source_split
from nnunetv2_desam.experiments.synthetic import DEFAULT_DOMAINS, write_synthetic_dataset
from tests.commands import run

SOURCE, TARGET = 951, 952
SOURCE_NAME, TARGET_NAME = f"Dataset{SOURCE}_{DEFAULT_DOMAINS[0].name}", f"Dataset{TARGET}_{DEFAULT_DOMAINS[1].name}"


def nnunet_folders(root: Path) -> dict:
    return {f"nnUNet_{n}": str(root / n) for n in ("raw", "preprocessed", "results")}


def fold_folder(root: Path, trainer: str, dataset: str = SOURCE_NAME) -> Path:
    """Where ``nnUNetv2_train <dataset> 2d 0 -tr <trainer>`` writes fold 0 in a workspace made by :func:`make_workspace`."""
    return root / "results" / dataset / f"{trainer}__nnUNetPlans__2d" / "fold_0"


def trainer_arguments(root: Path) -> tuple[dict, dict]:
    """(plans, dataset.json) of the source in a workspace made by :func:`make_workspace`, as ``nnUNetv2_train`` passes
    them to a trainer (with the ``continue_training`` key nnU-Net's trainer pops)."""
    plans = {**json.loads((root / "preprocessed" / SOURCE_NAME / "nnUNetPlans.json").read_text()), "continue_training": False}
    return plans, json.loads((root / "raw" / SOURCE_NAME / "dataset.json").read_text())


def make_workspace(root: Path, sam_checkpoint: Path) -> dict:
    """nnU-Net folders with a preprocessed source domain (9:1 split) and a raw target domain; returns the environment
    for the nnU-Net commands (a 1-epoch × 2-iteration budget, a 3×3 inference grid, no worker processes)."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}  # registered by nnunetv2_desam.pth
    env.update(
        nnunet_folders(root), DESAM_SAM_CHECKPOINT=str(sam_checkpoint), DESAM_EPOCHS="1", DESAM_ITERATIONS_PER_EPOCH="2",
        DESAM_VAL_ITERATIONS_PER_EPOCH="1", DESAM_GRID_SIZE="3", nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
    )
    write_synthetic_dataset(root / "raw", SOURCE, DEFAULT_DOMAINS[0], num_cases=5, seed=0, shape=(4, 48, 48))
    write_synthetic_dataset(root / "raw", TARGET, DEFAULT_DOMAINS[1], num_cases=2, seed=1, shape=(4, 48, 48))
    planning_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # planning needs it >= 1
    run(["nnUNetv2_plan_and_preprocess", "-d", str(SOURCE), "-c", "2d", "-np", "1"], planning_env)
    with mock.patch.dict(os.environ, nnunet_folders(root)):
        write_source_split(SOURCE, log=lambda *a: None)
    return env
