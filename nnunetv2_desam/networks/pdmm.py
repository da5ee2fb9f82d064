"""PDMM, the prompt-decoupled mask module: a small U-Net decoder over the encoder taps."""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import nn


def se_residual_block(in_channels: int, out_channels: int) -> BasicBlockD:
    """conv3×3-IN-LReLU-conv3×3-IN-SE(1/16) + residual (1×1 conv + IN when widths differ), LReLU."""
    return BasicBlockD(
        nn.Conv2d, in_channels, out_channels, kernel_size=3, stride=1, conv_bias=True,
        norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        squeeze_excitation=True, squeeze_excitation_reduction_ratio=1.0 / 16,
    )


def conv_of_concatenation(conv: nn.Conv2d, inputs: Sequence[torch.Tensor], prompts_per_image: int) -> torch.Tensor:
    """``conv(cat(inputs, 1))`` where inputs with B rows are image-level, those with B·P rows per prompt.

    A convolution of a channel concatenation is the sum of convolutions of the parts with the
    matching slices of the weight, so each image-level part is convolved once per image and
    broadcast over its P prompts instead of being repeated P times first. Out: (B·P)×C_out×h×w.
    """
    weights = conv.weight.split([part.shape[1] for part in inputs], dim=1)
    per_prompt_rows = max(part.shape[0] for part in inputs)
    per_prompt, per_image = conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0, 0
    for part, weight in zip(inputs, weights):
        out = F.conv2d(part, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        if part.shape[0] == per_prompt_rows:
            per_prompt = per_prompt + out
        else:
            per_image = per_image + out
    if not torch.is_tensor(per_image):
        return per_prompt
    return (per_prompt.unflatten(0, (-1, prompts_per_image)) + per_image[:, None]).flatten(0, 1)


def se_block_of_concatenation(block: BasicBlockD, inputs: Sequence[torch.Tensor], prompts_per_image: int) -> torch.Tensor:
    """``block(cat(inputs, 1))`` for :func:`se_residual_block` with a projection skip, image-level
    inputs (B rows) shared by their P prompts as in :func:`conv_of_concatenation`."""
    conv1, skip = block.conv1, block.skip[0]
    out = conv1.nonlin(conv1.norm(conv_of_concatenation(conv1.conv, inputs, prompts_per_image)))
    out = block.squeeze_excitation(block.conv2(out))
    out += skip.norm(conv_of_concatenation(skip.conv, inputs, prompts_per_image))
    return block.nonlin2(out)


def up_step(channels: int) -> nn.Sequential:
    """2×2 stride-2 transposed convolution followed by an SE residual block: doubles H and W."""
    return nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), se_residual_block(channels, channels))


def tap_up_steps(tap_grids: Sequence[int]) -> Tuple[int, int, int]:
    """Up-steps that bring taps on grids (shallow, middle, deep) to 4G, 2G and G, G = the deep tap's grid."""
    deep = tap_grids[2]
    steps = []
    for grid, scale in zip(tap_grids, (4, 2, 1)):
        if (scale * deep) % grid or ((scale * deep) // grid) & ((scale * deep) // grid - 1):
            raise ValueError(f"PDMM needs taps a power of two below 4G, 2G and G; got grids {tuple(tap_grids)}")
        steps.append(((scale * deep) // grid).bit_length() - 1)
    return tuple(steps)


class PDMM(nn.Module):
    """Multi-scale taps (+ PRIM's mask embedding) → segmentation logits.

    Widths follow the prompt embedding D (256 for official SAM): the deepest tap becomes D
    channels at G×G, the middle one D/2 at 2G, the shallowest D/4 at 4G (G: the embedding grid).
    Each tap reaches its scale through as many up-steps as it lies below it: ViT's taps are all at
    G (2, 1 and 0 up-steps, the paper's design), TinyViT's stage outputs at 2G, G and G (1, 1, 0).
    The decoder goes G → 2G → 4G with skip fusion; the 4G head is the output (a quarter of a ViT's
    encoder input, the whole 256² input of LiteMedSAM), the 2G head the deep-supervision output.

    The two heads (1×1 convolutions to K classes) are ``seg_layers[0]`` (4G) and ``seg_layers[1]``
    (2G): nnU-Net's name for class-count-dependent output layers, whose keys
    (``decoder.seg_layers.…``) ``nnUNetv2_train -pretrained_weights`` skips, so weights trained with
    another number of classes fine-tune.

    The work splits in two so that grid prompts can share it: :meth:`encode_taps` depends only on
    the image, :meth:`decode` on the prompt's mask embedding.
    """

    def __init__(self, tap_channels: Sequence[int], tap_grids: Sequence[int], width: int, num_classes: int, fuse_mask_embedding: bool):
        super().__init__()
        self.deep_supervision = False
        self.fuse_mask_embedding = fuse_mask_embedding
        half, quarter = width // 2, width // 4
        shallow, middle, deep = tap_channels
        up_steps = tap_up_steps(tap_grids)
        self.deep_branch = se_residual_block(deep, width)
        self.middle_branch = nn.Sequential(se_residual_block(middle, half), *(up_step(half) for _ in range(up_steps[1])))
        self.shallow_branch = nn.Sequential(se_residual_block(shallow, quarter), *(up_step(quarter) for _ in range(up_steps[0])))
        self.mask_embedding_fusion = se_residual_block(2 * width, width) if fuse_mask_embedding else None
        self.up_middle = nn.ConvTranspose2d(width, half, 2, stride=2)
        self.decode_middle = se_residual_block(width, half)
        self.up_shallow = nn.ConvTranspose2d(half, quarter, 2, stride=2)
        self.decode_shallow = se_residual_block(half, quarter)
        self.seg_layers = nn.ModuleList([nn.Conv2d(quarter, num_classes, 1), nn.Conv2d(half, num_classes, 1)])

    def encode_taps(self, taps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Taps (shallow, middle, deep) B×C_i×g_i×g_i → (B×D/4×4G×4G, B×D/2×2G×2G, B×D×G×G)."""
        shallow, middle, deep = taps
        return self.shallow_branch(shallow), self.middle_branch(middle), self.deep_branch(deep)

    def decode(
        self,
        features: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        mask_embedding: Optional[torch.Tensor],
        prompts_per_image: int = 1,
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Image features of B images and (B·P)×D×G×G mask embeddings → (B·P)×K×4G×4G logits.

        With deep supervision on, returns [4G output, 2G output]. Each fusion block convolves the
        image features once per image (:func:`se_block_of_concatenation`), not once per prompt;
        without mask-embedding fusion the prompt does not reach PDMM and it runs once per image.
        """
        if self.mask_embedding_fusion is None and prompts_per_image > 1:  # the prompt does not reach PDMM
            outputs = self.decode(features, None)
            if self.deep_supervision:
                return [o.repeat_interleave(prompts_per_image, dim=0) for o in outputs]
            return outputs.repeat_interleave(prompts_per_image, dim=0)
        shallow, middle, deep = features
        if self.mask_embedding_fusion is not None:
            deep = self._fuse(self.mask_embedding_fusion, [deep, mask_embedding], prompts_per_image)
        x = self._fuse(self.decode_middle, [self.up_middle(deep), middle], prompts_per_image)
        middle_logits = self.seg_layers[1](x) if self.deep_supervision else None
        x = self._fuse(self.decode_shallow, [self.up_shallow(x), shallow], prompts_per_image)
        logits = self.seg_layers[0](x)
        return [logits, middle_logits] if self.deep_supervision else logits

    def output_sides(self, grid: int) -> List[int]:
        """Sides of :meth:`decode`'s outputs for a G×G mask embedding: [4G], or [4G, 2G] with deep supervision."""
        return [4 * grid, 2 * grid] if self.deep_supervision else [4 * grid]

    @staticmethod
    def _fuse(block: BasicBlockD, inputs: List[torch.Tensor], prompts_per_image: int) -> torch.Tensor:
        if prompts_per_image == 1:
            return block(torch.cat(inputs, dim=1))
        return se_block_of_concatenation(block, inputs, prompts_per_image)

    def forward(
        self, taps: Sequence[torch.Tensor], mask_embedding: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """One prompt (or none) per image: taps of B images, mask embedding B×D×G×G."""
        return self.decode(self.encode_taps(taps), mask_embedding)
