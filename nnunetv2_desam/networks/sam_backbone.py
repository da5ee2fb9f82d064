"""The frozen SAM image encoder, tapped for DeSAM.

DeSAM reads four things off SAM's ViT: the outputs of the first three global-attention blocks
(PDMM's multi-scale inputs) and the neck output (PRIM's image embedding). TinyViT encoders
(MobileSAM, LiteMedSAM) are tapped at their stage outputs instead
(:class:`~nnunetv2_desam.networks.tinyvit_encoder.TinyViTBackbone`); :func:`build_backbone` picks by
the checkpoint. Both expose ``tap_channels`` and ``tap_grids`` (channels and side of each tap), which
size PDMM.
"""

from typing import Dict, List, Tuple, Union

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_image_encoder, image_encoder_state_dict
from nnunetv2_desam.networks.tinyvit_encoder import TinyViTBackbone


class SAMBackbone(nn.Module):
    """segment_anything's ``ImageEncoderViT`` returning the DeSAM taps.

    Input: SAM-normalised images B×3×S×S (S = the checkpoint's input size, 1024 for official files).
    Output: taps, three tensors B×C_enc×G×G (first three global blocks, shallow to deep), and the
    neck embedding B×D×G×G (G = S/16, D = 256 for official files).
    """

    num_taps = 3

    def __init__(self, encoder: ImageEncoderViT, global_attn_indexes: Tuple[int, ...]):
        super().__init__()
        if len(global_attn_indexes) < self.num_taps:
            raise ValueError(f"DeSAM needs {self.num_taps} global-attention blocks, the encoder has {len(global_attn_indexes)}")
        self.encoder = encoder
        self.tap_indexes = tuple(global_attn_indexes[: self.num_taps])
        _, grid, _, channels = encoder.pos_embed.shape  # 1×G×G×C_enc
        self.tap_channels = (channels,) * self.num_taps
        self.tap_grids = (grid,) * self.num_taps

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    def forward(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        x = self.encoder.patch_embed(images) + self.encoder.pos_embed  # B×G×G×C_enc
        taps = []
        for index, block in enumerate(self.encoder.blocks):
            x = block(x)
            if index in self.tap_indexes:
                taps.append(x.permute(0, 3, 1, 2))
        embedding = self.encoder.neck(x.permute(0, 3, 1, 2))
        return taps, embedding


def build_backbone(config: SAMConfig, sam_state_dict: Dict[str, torch.Tensor]) -> Union[SAMBackbone, TinyViTBackbone]:
    """The tapped image encoder of the checkpoint's family, with the checkpoint's encoder weights loaded
    (before ``eval()``: TinyViT's attention caches its biases when it enters eval mode)."""
    encoder = build_image_encoder(config)
    encoder.load_state_dict(image_encoder_state_dict(sam_state_dict))
    if config.tinyvit is not None:
        return TinyViTBackbone(encoder, config.tinyvit)
    return SAMBackbone(encoder, config.encoder_global_attn_indexes)
