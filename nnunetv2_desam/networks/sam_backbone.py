"""The frozen SAM image encoder, tapped for DeSAM.

DeSAM reads four things off SAM's ViT: the outputs of the first three global-attention blocks
(PDMM's multi-scale inputs) and the neck output (PRIM's image embedding).
"""

from typing import List, Tuple

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn


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
