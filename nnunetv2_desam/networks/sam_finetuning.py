"""What the SAM fine-tuning baselines (MedSAM, SAMed) share: their image input and one decoder call per image.

**Input.** Both feed their encoders RGB images scaled to [0, 1] without SAM's pixel mean/std:
MedSAM's ``train_one_gpu.py`` passes [0, 1] images straight to ``image_encoder``, SAMed's
``train.py`` builds SAM with ``pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1]`` on [0, 1] slices. The
patch is prepared as DeSAM prepares its own (channel mixing, intensities to 0–255, bilinear resize:
``DeSAM.to_sam_input``) with pixel mean 0 and std 255, which gives that [0, 1] range.
"""

import torch
from segment_anything.modeling import MaskDecoder
from torch import nn

from nnunetv2_desam.networks.desam import DeSAM, channel_mixing_matrix

UNIT_RANGE_PIXEL_STD = 255.0


def register_unit_range_input(network: nn.Module, num_input_channels: int) -> None:
    """The buffers :func:`unit_range_sam_input` reads (not saved: they follow from the input channels)."""
    network.register_buffer("channel_mixing", channel_mixing_matrix(num_input_channels), persistent=False)
    network.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1), persistent=False)
    network.register_buffer("pixel_std", torch.full((1, 3, 1, 1), UNIT_RANGE_PIXEL_STD), persistent=False)


def unit_range_sam_input(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W patch → B×3×S×S image in [0, 1] (S = ``network.image_encoder.img_size``)."""
    return DeSAM.to_sam_input(network, x)


def decode_each_image(
    mask_decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    """segment_anything's ``MaskDecoder.predict_masks`` for every image with the same P prompts.

    ``predict_masks`` decodes one image with several prompts (it repeats the image embedding per
    prompt), so a batch goes through it one image at a time.
    Shapes: embeddings B×D×G×G, image_pe 1×D×G×G, sparse P×T×D, dense P×D×G×G → masks B×P×M×4G×4G
    for the decoder's M mask tokens.
    """
    return torch.stack([mask_decoder.predict_masks(embedding[None], image_pe, sparse, dense)[0] for embedding in image_embeddings])
