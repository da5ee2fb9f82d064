"""MaxStyle's auxiliary image decoder for an nnU-Net encoder: reconstructs the input from the bottleneck alone.

It mirrors nnU-Net's ``UNetDecoder`` (transposed convolution + stacked conv blocks per stage, the encoder's
convolution, normalisation and non-linearity) without the skip connections, which would let it copy the
input instead of decoding it, and ends in a 1×1 convolution to the input channels with no activation
(nnU-Net's inputs are z-scored). Style layers may act after every stage and on the output image.
Training-only: it is not part of the network ``nnUNetv2_predict`` loads.
"""

from typing import Mapping, Optional, Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn


class ImageDecoder(nn.Module):
    """Bottleneck features B×F×(spatial/total stride) → image B×C×spatial.

    Style positions: 0 … ``len(stages)`` − 1 after each upsampling stage, ``len(stages)`` on the output image.
    """

    def __init__(self, encoder: nn.Module, image_channels: int, convolutions_per_stage: Sequence[int]):
        super().__init__()
        features, strides = encoder.output_channels, encoder.strides
        upsample = get_matching_convtransp(conv_op=encoder.conv_op)
        self.upsamplings = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s in range(1, len(features)):
            self.upsamplings.append(upsample(features[-s], features[-(s + 1)], strides[-s], strides[-s], bias=encoder.conv_bias))
            self.stages.append(StackedConvBlocks(
                convolutions_per_stage[s - 1], encoder.conv_op, features[-(s + 1)], features[-(s + 1)],
                encoder.kernel_sizes[-(s + 1)], 1, encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
                encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs,
            ))
        self.output = encoder.conv_op(features[0], image_channels, 1, 1, 0, bias=True)
        self.apply(InitWeights_He(1e-2))

    def position_channels(self):
        """Channels of the feature map at each style position."""
        return [stage.output_channels for stage in self.stages] + [self.output.out_channels]

    def forward(self, bottleneck: torch.Tensor, styles: Optional[Mapping[int, nn.Module]] = None) -> torch.Tensor:
        styles = styles or {}
        x = bottleneck
        for position, (upsampling, stage) in enumerate(zip(self.upsamplings, self.stages)):
            x = stage(upsampling(x))
            if position in styles:
                x = styles[position](x)
        x = self.output(x)
        if len(self.stages) in styles:
            x = styles[len(self.stages)](x)
        return x
