"""PRIM, the prompt-relevant IoU module: SAM's mask decoder without its mask head."""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, TWO_WAY_TRANSFORMER_HEADS, sub_state_dict


class IoUHead(nn.Module):
    """SAM's IoU-prediction MLP (``depth`` linear layers, ReLU between them) with one output per foreground class.

    Written here rather than reusing segment_anything's ``MLP`` only to name the last layer: it is
    ``seg_layers[0]``, nnU-Net's name for class-count-dependent output layers, whose keys
    ``nnUNetv2_train -pretrained_weights`` skips, so weights trained with another number of classes
    fine-tune. In: tokens N×D; out: N×outputs.
    """

    def __init__(self, dim: int, hidden_dim: int, outputs: int, depth: int):
        super().__init__()
        widths = [dim] + [hidden_dim] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.seg_layers = nn.ModuleList([nn.Linear(widths[-1], outputs)])

    def load_sam_iou_head(self, head: Dict[str, torch.Tensor]) -> None:
        """Load SAM's ``iou_prediction_head.*`` entries; every output starts as SAM's first one."""
        last = f"layers.{len(self.layers)}."
        weight, bias = head.pop(last + "weight"), head.pop(last + "bias")
        outputs = self.seg_layers[0].out_features
        head["seg_layers.0.weight"], head["seg_layers.0.bias"] = weight[:1].repeat(outputs, 1), bias[:1].repeat(outputs)
        self.load_state_dict(head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = F.relu(layer(tokens))
        return self.seg_layers[0](tokens)


class PRIM(nn.Module):
    """SAM's two-way transformer with the IoU token, mask tokens and IoU head.

    Returns the transformer's updated image tokens as the *mask embedding* (what PDMM fuses) and
    one predicted IoU per foreground class. SAM's output upscaling and hypernetwork MLPs are
    dropped. With ``num_iou_outputs=0`` the IoU head is left out, and so are the transformer's
    final token-to-image attention and its norm, which only feed that head (they are kept but
    frozen, so every trainable parameter gets a gradient, as DDP requires).
    """

    def __init__(self, config: SAMConfig, num_iou_outputs: int):
        super().__init__()
        dim = config.prompt_embed_dim
        self.transformer = TwoWayTransformer(
            depth=config.transformer_depth,
            embedding_dim=dim,
            mlp_dim=config.transformer_mlp_dim,
            num_heads=TWO_WAY_TRANSFORMER_HEADS,
            attention_downsample_rate=config.attention_downsample_rate,
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(config.num_mask_tokens, dim)
        self.iou_prediction_head: Optional[IoUHead] = None
        if num_iou_outputs > 0:
            self.iou_prediction_head = IoUHead(dim, config.iou_head_hidden_dim, num_iou_outputs, config.iou_head_depth)
        else:
            for module in (self.transformer.final_attn_token_to_image, self.transformer.norm_final_attn):
                module.requires_grad_(False)

    def load_sam_mask_decoder(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Initialise from a SAM state dict; every IoU output starts as SAM's first one."""
        decoder = sub_state_dict(state_dict, "mask_decoder.")
        self.transformer.load_state_dict(sub_state_dict(decoder, "transformer."))
        self.iou_token.load_state_dict(sub_state_dict(decoder, "iou_token."))
        self.mask_tokens.load_state_dict(sub_state_dict(decoder, "mask_tokens."))
        if self.iou_prediction_head is not None:
            self.iou_prediction_head.load_sam_iou_head(sub_state_dict(decoder, "iou_prediction_head."))

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt: torch.Tensor,
        dense_prompt: torch.Tensor,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            image_embedding: B×D×G×G, one per image.
            image_pe: 1×D×G×G positional encoding of the token grid.
            sparse_prompt: (B·P)×T×D prompt tokens, P prompts per image, grouped by image.
            dense_prompt: (B·P)×D×G×G (SAM's no-mask embedding in automatic use).
        Returns:
            mask embedding (B·P)×D×G×G and IoU predictions (B·P)×(K-1), or None without IoU head.
        """
        prompts_per_image = sparse_prompt.shape[0] // image_embedding.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(sparse_prompt.shape[0], -1, -1), sparse_prompt], dim=1)
        src = image_embedding.repeat_interleave(prompts_per_image, dim=0) + dense_prompt
        batch, dim, height, width = src.shape
        queries, keys = self.transformer(src, image_pe, tokens)
        mask_embedding = keys.transpose(1, 2).reshape(batch, dim, height, width)
        if self.iou_prediction_head is None:
            return mask_embedding, None
        return mask_embedding, self.iou_prediction_head(queries[:, 0])
