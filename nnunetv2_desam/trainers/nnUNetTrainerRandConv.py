"""RandConv (Xu et al., ICLR 2021) as an nnU-Net trainer: random convolutions of the batch plus their consistency loss.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch

from nnunetv2_desam.augmentation.consistency import MultiViewTraining
from nnunetv2_desam.augmentation.random_convolution import RandConvSettings, js_consistency, randconv_views
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget


class nnUNetTrainerRandConv(MultiViewTraining, nnUNetTrainerBudget):
    """nnU-Net's network, plans, augmentation and schedule; each step trains on three RandConv views of the
    augmented batch (kernel size from {1, 3, 5, 7}, Kaiming-normal weights, mixed with the input by α ~ U(0, 1)):
    segmentation loss on the first view + 10 × their consistency loss. A step processes 3× the batch."""

    settings = RandConvSettings()

    def views(self, data: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return randconv_views(data, self.settings)

    def consistency(self, logits):
        return js_consistency(logits)
