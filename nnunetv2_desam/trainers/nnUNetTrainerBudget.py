"""The stock nnU-Net trainer with the ``DESAM_*`` budget and batch-size variables honoured.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_desam.environment_variables import apply_training_overrides


class nnUNetTrainerBudget(nnUNetTrainer):
    """nnUNetTrainer, shortened (or lengthened) by DESAM_EPOCHS / _ITERATIONS_PER_EPOCH / _VAL_ITERATIONS_PER_EPOCH
    and DESAM_BATCH_SIZE: the fair baseline for runs on the DeSAM trainers' budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_training_overrides(self)
