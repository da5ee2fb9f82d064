"""AdvBias (Chen et al., MICCAI 2020) as an nnU-Net trainer: an adversarial bias field and its consistency loss.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch

from nnunetv2_desam.augmentation.adversarial_bias import BiasFieldSettings, adversarial_bias, clean_vs_biased_consistency
from nnunetv2_desam.augmentation.consistency import MultiViewTraining
from nnunetv2_desam.training_step import autocast_on_cuda
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget


class nnUNetTrainerAdvBias(MultiViewTraining, nnUNetTrainerBudget):
    """nnU-Net's network, plans, augmentation and schedule; each step finds the batch's adversarial bias field (one
    projected gradient-ascent step of a smooth field within [0.7, 1.3]) and trains on the clean and the biased batch:
    segmentation loss on the clean one + 1 × the KL + 0.5·contour divergence of the biased prediction from the clean
    one. A step processes 2× the batch, plus one forward/backward pass for the field."""

    settings = BiasFieldSettings()

    def views(self, data: torch.Tensor) -> torch.Tensor:
        """The clean batch and its adversarially biased copy; the field is searched on the plain network (DDP only
        synchronises full backward passes), under nnU-Net's autocast and grad scaler."""
        network = self.network.module if self.is_ddp else self.network
        scale_loss = self.grad_scaler.scale if self.grad_scaler is not None else (lambda loss: loss)
        with autocast_on_cuda(self.device):
            biased = adversarial_bias(network, data, self.settings, scale_loss)
        return torch.cat([data, biased])

    def consistency(self, logits):
        return clean_vs_biased_consistency(logits, self.settings.contour_weight)
