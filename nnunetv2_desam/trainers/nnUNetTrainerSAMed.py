"""SAMed as an nnU-Net trainer: LoRA on SAM's encoder, fine-tuned mask decoder, one output per class, no prompt.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch

from nnunetv2_desam.environment_variables import sam_checkpoint_path
from nnunetv2_desam.networks.sam_input import intensity_windows_from_plans
from nnunetv2_desam.networks.samed import SAMed
from nnunetv2_desam.trainers.nnUNetTrainerSAMFineTuning import nnUNetTrainerSAMFineTuning


class WarmupPolySchedule:
    """SAMed's learning rate per iteration (their ``trainer.py``): lr·(i+1)/warmup for the first
    ``warmup`` iterations, then lr·(1 − (i − warmup)/total)^0.9.

    nnU-Net calls ``step(epoch)`` at the start of each epoch; the trainer calls :meth:`advance`
    after each update. (nnU-Net's own schedulers change the rate once per epoch.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, warmup: int, total: int, iterations_per_epoch: int):
        self.optimizer, self.initial_lr = optimizer, initial_lr
        self.warmup, self.total, self.iterations_per_epoch = warmup, total, iterations_per_epoch
        self.iteration = 0

    def learning_rate(self, iteration: int) -> float:
        if iteration < self.warmup:
            return self.initial_lr * (iteration + 1) / self.warmup
        return self.initial_lr * max(0.0, 1.0 - (iteration - self.warmup) / self.total) ** 0.9

    def step(self, epoch: int) -> None:
        self._set(epoch * self.iterations_per_epoch)

    def advance(self) -> None:
        self._set(self.iteration + 1)

    def _set(self, iteration: int) -> None:
        self.iteration = iteration
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)


class nnUNetTrainerSAMed(nnUNetTrainerSAMFineTuning):
    """SAMed: rank-4 LoRA on q and v of every encoder block, decoder and no-mask embedding fine-tuned; 0.2·CE + 0.8·Dice.

    The authors' settings (``train.py``/``trainer.py``, run with ``--warmup --AdamW``): AdamW, lr
    0.005, weight decay 0.1, linear warm-up over 250 iterations, then poly decay. Their batch was 24
    and their schedule ~18 k iterations; here DeSAM's budget and batch size apply (see
    :class:`nnUNetTrainerSAMFineTuning`). Needs ``DESAM_SAM_CHECKPOINT`` for training and prediction.
    """

    method = "SAMed"
    learning_rate = 0.005
    adamw_weight_decay = 0.1
    warmup_iterations = 250
    ce_weight, dice_weight = 0.2, 0.8

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision: bool = True) -> SAMed:
        """From DESAM_SAM_CHECKPOINT (called by the trainer and by nnUNetv2_predict)."""
        cls.require_2d(configuration_manager)
        windows = intensity_windows_from_plans(plans_manager, configuration_manager)
        return SAMed.from_sam_checkpoint(sam_checkpoint_path(), num_input_channels, num_output_channels, intensity_windows=windows)

    def _build_loss(self):
        """nnU-Net's Dice + CE (softmax), weighted as SAMed weighs its own: 0.2 CE + 0.8 Dice."""
        loss = super()._build_loss()
        loss.weight_ce, loss.weight_dice = self.ce_weight, self.dice_weight
        return loss

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        total = self.num_epochs * self.num_iterations_per_epoch
        return optimizer, WarmupPolySchedule(optimizer, self.initial_lr, self.warmup_iterations, total, self.num_iterations_per_epoch)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.lr_scheduler.advance()
        return result
