"""MedSAM as an nnU-Net trainer: image encoder and mask decoder fine-tuned, whole-image box, one pass per class.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch._dynamo import OptimizedModule

from nnunetv2_desam.environment_variables import sam_checkpoint_path
from nnunetv2_desam.networks.medsam import MedSAM, PerClassDiceBCELoss
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig
from nnunetv2_desam.networks.sam_input import intensity_windows_from_plans
from nnunetv2_desam.trainers.nnUNetTrainerSAMFineTuning import nnUNetTrainerSAMFineTuning

# Key of the model folder's plans.json configuration under which training records the SAM geometry.
SAM_ARCHITECTURE_KEY = "sam_architecture"


class nnUNetTrainerMedSAM(nnUNetTrainerSAMFineTuning):
    """MedSAM: encoder and mask decoder fine-tuned, prompt encoder frozen, whole-image box; Dice + BCE per class.

    The authors' settings (``train_one_gpu.py``, ``train_multi_gpus.py``): AdamW, lr 1e-4, weight
    decay 0.01, constant learning rate, batch 8 per GPU. Their budget was 1000 epochs over all
    slices; here DeSAM's budget applies (see :class:`nnUNetTrainerSAMFineTuning`).

    Training reads ``DESAM_SAM_CHECKPOINT`` (an official SAM file or MedSAM's ``medsam_vit_b.pth``)
    and records the SAM geometry in the model folder's ``plans.json``; the checkpoint holds every
    weight, so ``nnUNetv2_predict`` builds the network from that record and needs no SAM file.
    """

    method = "MedSAM"
    learning_rate = 1e-4
    adamw_weight_decay = 0.01

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision: bool = True) -> MedSAM:
        """Prediction: random weights in the geometry recorded at training (the checkpoint fills them). Training: the SAM file."""
        cls.require_2d(configuration_manager)
        windows = intensity_windows_from_plans(plans_manager, configuration_manager)
        architecture = configuration_manager.configuration.get(SAM_ARCHITECTURE_KEY)
        if architecture is not None:
            return MedSAM(SAMConfig.from_dict(architecture), num_input_channels, num_output_channels, intensity_windows=windows)
        return MedSAM.from_sam_checkpoint(sam_checkpoint_path(), num_input_channels, num_output_channels, intensity_windows=windows)

    def _build_loss(self) -> PerClassDiceBCELoss:
        """nnU-Net's region loss (sigmoid Dice + BCE, 1:1) on each foreground class, as MedSAM trains each mask."""
        dice_and_bce = DC_and_BCE_loss(
            {}, {"batch_dice": self.configuration_manager.batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": self.is_ddp},
            use_ignore_label=self.label_manager.ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss,
        )
        return PerClassDiceBCELoss(dice_and_bce, self.label_manager.num_segmentation_heads, self.label_manager.ignore_label)

    def configure_optimizers(self):
        """AdamW at a constant rate: nnU-Net's poly schedule with exponent 0."""
        optimizer = self.make_optimizer()
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)

    def slim_final_checkpoint(self, checkpoint: dict) -> None:
        """Also store the weights in half precision: half the size (ViT-B: 188 instead of 375 MB), and
        the predictions change less than nnU-Net's own fp16 accumulation of the network's outputs
        changes them (``scripts/benchmark_medsam.py``). Loading casts them back to fp32."""
        super().slim_final_checkpoint(checkpoint)
        weights = checkpoint["network_weights"]
        checkpoint["network_weights"] = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.local_rank == 0:
            path = join(self.output_folder_base, "plans.json")
            plans = load_json(path)
            plans["configurations"][self.configuration_name][SAM_ARCHITECTURE_KEY] = self._medsam().sam_config.to_dict()
            save_json(plans, path, sort_keys=False)

    def _medsam(self) -> MedSAM:
        network = self.network.module if self.is_ddp else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network
