"""The SAM trainers train without mirroring, nnU-Net's trainer with it: the transforms of the training data loader each
trainer builds for ``nnUNetv2_train``. A mirrored slice swaps left and right; DeSAM-P trained with mirroring labelled
both kidneys of real CT as the left one (documentation/nnunet_options.md)."""

import os
from unittest import mock

import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM_Box import nnUNetTrainerDeSAM_Box
from nnunetv2_desam.trainers.nnUNetTrainerMedSAM import nnUNetTrainerMedSAM
from nnunetv2_desam.trainers.nnUNetTrainerSAMed import nnUNetTrainerSAMed
from tests.nnunet_workspace import nnunet_folders, trainer_arguments


def transforms_of(transform):
    """Every transform inside nnU-Net's composed (and randomly applied) training transforms."""
    yield transform
    for inner in getattr(transform, "transforms", None) or [getattr(transform, "transform", None)]:
        if inner is not None:
            yield from transforms_of(inner)


@pytest.mark.parametrize("trainer_class, mirrors", [(nnUNetTrainer, True), (nnUNetTrainerDeSAM, False),
                                                    (nnUNetTrainerDeSAM_Box, False), (nnUNetTrainerMedSAM, False),
                                                    (nnUNetTrainerSAMed, False)])
def test_only_nnunets_own_trainer_mirrors_its_training_data(workspace, trainer_class, mirrors):
    root, env = workspace
    plans, dataset_json = trainer_arguments(root)
    with mock.patch.dict(os.environ, {**nnunet_folders(root), "DESAM_SAM_CHECKPOINT": env["DESAM_SAM_CHECKPOINT"],
                                      "nnUNet_n_proc_DA": "0"}):
        trainer = trainer_class(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        training_loader, _ = trainer.get_dataloaders()
    transforms = list(transforms_of(training_loader.data_loader.transforms))
    assert len(transforms) > 5  # the walk reaches nnU-Net's augmentations
    assert any(isinstance(t, MirrorTransform) for t in transforms) == mirrors
    assert trainer.inference_allowed_mirroring_axes == ((0, 1) if mirrors else None)
