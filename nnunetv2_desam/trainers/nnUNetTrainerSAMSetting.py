"""The training setting every SAM-based trainer here shares (DeSAM and its ablations, MedSAM, SAMed); not a method to train.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_desam.environment_variables import apply_training_overrides
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.slim_checkpoint import drop_optimizer_moments, is_final_checkpoint, save_slim_checkpoint
from nnunetv2_desam.trainer_checks import check_before_nnunet_starts, require_2d

PAPER_BATCH_SIZE = 8


class nnUNetTrainerSAMSetting(nnUNetTrainer):
    """What the SAM trainers share, so that the rows of Table 2 differ only by method.

    Checked before nnU-Net starts: 2D and a SAM file the networks can build on. Plain labels (no
    regions). DeSAM's budget of 50 epochs × 100 iterations at the paper's batch 8 (``DESAM_EPOCHS``
    and friends, ``DESAM_BATCH_SIZE`` override it). No mirroring, in training or at test time: a mirrored slice
    swaps left and right, and DeSAM-P trained with it labelled both kidneys of real CT as the left one (the authors
    train without flips; documentation/nnunet_options.md). ``checkpoint_final.pth`` is written once, slimmed by
    :meth:`slim_final_checkpoint` (Adam's moments, 2× the trained weights, dropped; ``--c`` still loads it).
    Subclasses name their ``method``.
    """

    method = ""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        if not type(self).method:
            raise ConfigurationError(f"{type(self).__name__} is the setting the SAM trainers share; train one of them")
        check_before_nnunet_starts(plans, configuration, type(self).method)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise ConfigurationError(f"region-based datasets are not supported by {self.method}; use plain labels")
        self.num_epochs = 50
        self.num_iterations_per_epoch = 100
        self.configuration_manager.configuration["batch_size"] = PAPER_BATCH_SIZE
        apply_training_overrides(self)

    @classmethod
    def require_2d(cls, configuration_manager) -> None:
        """For build_network_architecture, which nnUNetv2_predict calls without the trainer's checks."""
        require_2d(configuration_manager.patch_size, cls.method)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    def save_checkpoint(self, filename: str) -> None:
        if is_final_checkpoint(filename):
            save_slim_checkpoint(super().save_checkpoint, filename, self.slim_final_checkpoint)
        else:
            super().save_checkpoint(filename)

    def slim_final_checkpoint(self, checkpoint: dict) -> None:
        drop_optimizer_moments(checkpoint)
