"""Small SAM checkpoints with random weights in the official key layouts, for the tests and the demo.

They go through the same loader as Meta's files and MobileSAM's ``mobile_sam.pt``
(:func:`nnunetv2_desam.networks.sam_checkpoint.load_sam_state_dict`); only the size differs.
"""

from typing import Tuple

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from nnunetv2_desam.networks.sam_checkpoint import TWO_WAY_TRANSFORMER_HEADS, SAMConfig, build_sam
from nnunetv2_desam.networks.tinyvit_encoder import EMBEDDING_GRID, tinyvit_class


def write_random_sam_checkpoint(
    path: str,
    img_size: int = 128,
    embed_dim: int = 32,
    depth: int = 8,
    num_heads: int = 2,
    window_size: int = 4,
    global_attn_indexes: Tuple[int, ...] = (1, 3, 5, 7),
    prompt_embed_dim: int = 32,
    transformer_mlp_dim: int = 64,
    seed: int = 0,
) -> SAMConfig:
    """Write a small SAM with random weights in the official key layout (tests and the demo).

    The relative-position tables are randomised too (SAM zero-initialises them, which would hide
    errors in how they are used).
    """
    config = SAMConfig(
        img_size=img_size, patch_size=16, encoder_embed_dim=embed_dim, encoder_depth=depth,
        encoder_num_heads=num_heads, encoder_mlp_ratio=4.0, encoder_window_size=window_size,
        encoder_global_attn_indexes=tuple(global_attn_indexes), prompt_embed_dim=prompt_embed_dim,
        mask_in_chans=16, num_mask_tokens=4, transformer_depth=2, transformer_mlp_dim=transformer_mlp_dim,
        attention_downsample_rate=2, iou_head_depth=3, iou_head_hidden_dim=prompt_embed_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(config)
        with torch.no_grad():
            for name, parameter in sam.named_parameters():
                if "rel_pos" in name or "pos_embed" in name:
                    parameter.normal_(std=0.1)
    torch.save(sam.state_dict(), path)
    return config


def write_random_mobile_sam_checkpoint(
    path: str,
    embed_dims: Tuple[int, ...] = (32, 64, 80, 320),
    depths: Tuple[int, ...] = (1, 1, 2, 1),
    num_heads: Tuple[int, ...] = (1, 2, 2, 5),
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7),
    transformer_mlp_dim: int = 256,
    num_classes: int = 1000,
    seed: int = 0,
) -> None:
    """Write a small SAM with random weights in MobileSAM's layout (``vit_t``: TinyViT, 1024² input).

    mobile_sam's own TinyViT, its ImageNet classifier (``image_encoder.norm_head/head``) included
    as in ``mobile_sam.pt``; narrower stages than ``vit_t``'s (64, 128, 160, 320). The last stage
    keeps 320 channels: TinyViT's last PatchMerging keeps the grid only for that width. Attention
    biases and BatchNorm affine weights and statistics are randomised too (TinyViT initialises them
    to constants, which would hide errors in how they are loaded).
    """
    prompt_dim = 256  # TinyViT's neck
    img_size = 1024
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = tinyvit_class(3)(
            img_size=img_size, in_chans=3, num_classes=num_classes, embed_dims=list(embed_dims),
            depths=list(depths), num_heads=list(num_heads), window_sizes=list(window_sizes), drop_path_rate=0.0,
        )
        sam = Sam(
            image_encoder=encoder,
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim, image_embedding_size=(EMBEDDING_GRID, EMBEDDING_GRID),
                input_image_size=(img_size, img_size), mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                transformer_dim=prompt_dim,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=prompt_dim, mlp_dim=transformer_mlp_dim, num_heads=TWO_WAY_TRANSFORMER_HEADS,
                ),
                num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
            ),
        )
        with torch.no_grad():
            for name, tensor in sam.state_dict().items():
                if "attention_biases" in name or name.endswith(("bn.bias", "bn.running_mean")):
                    tensor.normal_(std=0.1)
                elif name.endswith(("bn.weight", "bn.running_var")):
                    tensor.uniform_(0.5, 1.5)
    torch.save(sam.state_dict(), path)
