"""Small SAM checkpoints with random weights in the official key layout, for the tests and the demo.

They go through the same loader as Meta's files (:func:`nnunetv2_desam.networks.sam_checkpoint.load_sam_state_dict`);
only the size differs.
"""

from typing import Tuple

import torch

from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_sam


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
