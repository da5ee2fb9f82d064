"""MaxStyle (Chen et al., MICCAI 2022) as an nnU-Net trainer: adversarially stylised images from an auxiliary decoder.

nnU-Net imports this file as a top-level module from the folder in ``nnUNet_extTrainer``, so the
rest of the package is imported absolutely.
"""

import torch
import torch.nn.functional as F
from torch._dynamo import OptimizedModule

from nnunetv2_desam.augmentation.consistency import select_view
from nnunetv2_desam.augmentation.maxstyle import MaxStyleSettings, maxstyle_images
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.networks.image_decoder import ImageDecoder
from nnunetv2_desam.training_step import autocast_on_cuda, backward_and_step
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget

IMAGE_DECODER_KEY = "maxstyle_image_decoder_weights"


class nnUNetTrainerMaxStyle(nnUNetTrainerBudget):
    """nnU-Net's network, plans, augmentation and schedule, plus MaxStyle's auxiliary image decoder on the encoder's
    bottleneck. Each step: the decoder's MaxStyle layers are optimised (Adam, 5 steps) to raise the segmentation loss
    of the images it decodes; the network is then trained on the batch with 0.05 input noise and on the stylised
    batch (segmentation loss on both), the decoder on reconstructing the clean batch from both (mean squared error).

    What ``nnUNetv2_predict`` loads is the plain nnU-Net network: ``build_network_architecture`` is nnU-Net's and
    checkpoints' ``network_weights`` hold only it; the decoder's weights travel under their own key for ``--c``.
    """

    settings = MaxStyleSettings()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            raise ConfigurationError("nnUNetTrainerMaxStyle trains an image decoder outside the DDP-wrapped network; train it on one GPU")

    def segmentation_network(self) -> torch.nn.Module:
        """The network without torch.compile's wrapper: the step calls its encoder and decoder separately."""
        return self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule, with the image decoder's parameters as a second group of the same settings.

        The decoder is built here, from the encoder's layout, because nnU-Net creates the optimizer right after the network.
        """
        network = self.segmentation_network()
        convolutions = [len(stage.convs) for stage in network.decoder.stages]
        self.image_decoder = ImageDecoder(network.encoder, self.num_input_channels, convolutions).to(self.device)
        optimizer, lr_scheduler = super().configure_optimizers()
        optimizer.add_param_group({"params": list(self.image_decoder.parameters())})
        return optimizer, lr_scheduler

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(self.device, non_blocking=True)
        network = self.segmentation_network()
        noisy = data + self.settings.input_noise_std * torch.randn_like(data)
        with autocast_on_cuda(self.device):
            stylised = self.stylise(network, noisy, data, target)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_on_cuda(self.device):
            features = network.encoder(torch.cat([noisy, stylised]))
            output = network.decoder(features)
            reconstruction = self.image_decoder(features[-1])
            batch_size = data.shape[0]
            loss = (self.loss(select_view(output, 0, batch_size), target) + self.loss(select_view(output, 1, batch_size), target)
                    + F.mse_loss(reconstruction.float(), torch.cat([data, data])))
        backward_and_step(loss, self.optimizer, self.grad_scaler, [*network.parameters(), *self.image_decoder.parameters()])
        return {"loss": loss.detach().cpu().numpy()}

    def stylise(self, network: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, target) -> torch.Tensor:
        """MaxStyle images of the batch: decoded from the noisy batch's bottleneck, styles searched against ``target``."""
        with torch.no_grad():
            bottleneck = network.encoder(noisy)[-1]
        scale_loss = self.grad_scaler.scale if self.grad_scaler is not None else (lambda loss: loss)
        return maxstyle_images(self.image_decoder, bottleneck, lambda images: self.loss(network(images), target), clean, self.settings, scale_loss)

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint[IMAGE_DECODER_KEY] = self.image_decoder.state_dict()
            torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        if IMAGE_DECODER_KEY in checkpoint:
            self.image_decoder.load_state_dict(checkpoint[IMAGE_DECODER_KEY])
