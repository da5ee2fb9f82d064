"""SAMed (Zhang & Liu 2023): LoRA on SAM's image encoder, no prompt, one decoder output per class.

As the authors' code (``hitachinsk/SAMed``: ``sam_lora_image_encoder.py``, ``segment_anything/build_sam.py``,
``train.py``, ``trainer.py``) builds it:

- **Encoder.** Frozen, with rank-4 LoRA on the query and value thirds of every block's fused ``qkv``
  projection (key untouched): A Kaiming-uniform, B zero, no scaling. Input 512×512 for SAM's
  1024 (half the SAM file's input size), so the positional embedding is resized bilinearly and
  the relative-position tables of the global-attention blocks linearly (``load_from``).
- **Prompt encoder.** Called without prompts: its no-mask embedding is the only dense input and
  the only part of it that receives a gradient, so it alone trains.
- **Mask decoder.** Fine-tuned, with K mask tokens for nnU-Net's K classes (background included),
  all returned (SAMed comments out SAM's multimask slice): K logits per pixel, softmax. The
  class-dependent parts (mask tokens, their hypernetwork MLPs) start fresh, as in ``load_from``;
  the IoU head is not built, since SAMed's loss never reads it.

Checkpoints hold the LoRA matrices, the decoder, the no-mask embedding and the SAM file's
fingerprint (:mod:`nnunetv2_desam.networks.frozen_sam_weights`).
"""

from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder
from torch import nn

from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.networks.fast_attention import fuse_encoder_attention
from nnunetv2_desam.networks.fingerprint_cache import load_sam_state_dict_and_fingerprint
from nnunetv2_desam.networks.frozen_sam_weights import keep_frozen_sam_weights_out_of_checkpoints, untrained_state_keys
from nnunetv2_desam.networks.sam_checkpoint import (
    SAMConfig,
    build_image_encoder,
    build_mask_decoder,
    build_prompt_encoder,
    sub_state_dict,
)
from nnunetv2_desam.networks.sam_finetuning import UnitRangeInput, decode_each_image

LORA_RANK = 4
CLASS_DEPENDENT_DECODER_PARTS = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")


class LoRAQV(nn.Module):
    """SAM's fused ``qkv`` projection (D → 3D, frozen) with rank-r updates of its q and v outputs.

    ``out = qkv(x) + [B_q A_q x, 0, B_v A_v x]``; in: …×D, out: …×3D. Written here rather than
    taken from ``peft``: peft's LoRA adapts the whole output of a Linear layer and has no way to
    adapt only some slices of a fused projection (q and v but not k, as SAMed does), which its
    maintainers confirm in huggingface/peft#1705.
    """

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        dim = qkv.in_features
        self.base = qkv.requires_grad_(False)
        self.lora_q_a, self.lora_v_a = nn.Linear(dim, rank, bias=False), nn.Linear(dim, rank, bias=False)
        self.lora_q_b, self.lora_v_b = nn.Linear(rank, dim, bias=False), nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.lora_q_b.weight)  # A keeps nn.Linear's Kaiming-uniform init, as in SAMed
        nn.init.zeros_(self.lora_v_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.base(x).chunk(3, dim=-1)
        return torch.cat([q + self.lora_q_b(self.lora_q_a(x)), k, v + self.lora_v_b(self.lora_v_a(x))], dim=-1)


class PerClassMaskDecoder(MaskDecoder):
    """segment_anything's ``MaskDecoder`` (its ``predict_masks`` runs unchanged) with one mask token per class.

    The class-dependent modules live under ``seg_layers`` (keys ``….seg_layers.mask_tokens.…``),
    nnU-Net's name for output layers that ``-pretrained_weights`` does not transfer. The IoU head is
    an identity: SAMed's loss ignores the IoU prediction, so the head would never train.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seg_layers = nn.ModuleDict({name: self._modules.pop(name) for name in CLASS_DEPENDENT_DECODER_PARTS[:2]})
        self.iou_prediction_head = nn.Identity()

    @property
    def mask_tokens(self) -> nn.Embedding:
        return self.seg_layers["mask_tokens"]

    @property
    def output_hypernetworks_mlps(self) -> nn.ModuleList:
        return self.seg_layers["output_hypernetworks_mlps"]


def resized_encoder_state_dict(encoder_state_dict: Dict[str, torch.Tensor], config: SAMConfig, img_size: int) -> Dict[str, torch.Tensor]:
    """The encoder entries of a SAM file for input ``img_size`` (SAMed's ``load_from``).

    pos_embed 1×G×G×C is resized bilinearly to the new token grid, the relative-position tables of
    the global blocks (2G−1)×c linearly (segment_anything's ``get_rel_pos`` rule); windowed blocks
    keep theirs.
    """
    grid = img_size // config.patch_size
    resized = dict(encoder_state_dict)
    pos_embed = encoder_state_dict["pos_embed"].permute(0, 3, 1, 2)
    resized["pos_embed"] = F.interpolate(pos_embed, size=(grid, grid), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    for block in config.encoder_global_attn_indexes:
        for axis in ("h", "w"):
            key = f"blocks.{block}.attn.rel_pos_{axis}"
            table = encoder_state_dict[key].T.unsqueeze(0)
            resized[key] = F.interpolate(table, size=2 * grid - 1, mode="linear", align_corners=False).squeeze(0).T
    return resized


class SAMed(nn.Module):
    """The SAMed network with nnU-Net's contract: B×C×H×W patch → B×K×H×W logits.

    Build it with :meth:`from_sam_checkpoint`. ``fused_attention`` swaps segment_anything's encoder
    attention for the exact fused one (off: the reference, for tests). ``intensity_windows``: one
    (low, high) of nnU-Net's normalised units per channel (:func:`~nnunetv2_desam.networks.sam_input.intensity_windows`).
    """

    def __init__(self, sam_state_dict: Dict[str, torch.Tensor], num_input_channels: int, num_classes: int,
                 rank: int = LORA_RANK, fused_attention: bool = True,
                 intensity_windows: Optional[Sequence[Tuple[float, float]]] = None, fingerprint: Optional[str] = None):
        super().__init__()
        config = SAMConfig.from_state_dict(sam_state_dict)
        if config.family != "vit":
            raise SAMCheckpointError(
                "SAMed needs a ViT SAM file (sam_vit_b_01ec64.pth, as its authors): its LoRA adapts the ViT's global qkv "
                "projections at half the input size, which a TinyViT (MobileSAM, LiteMedSAM) does not have; set "
                "DESAM_SAM_CHECKPOINT to a ViT-B/L/H file"
            )
        self.sam_config = config
        self.input_config = replace(config, img_size=config.img_size // 2)
        self.image_encoder = self._lora_encoder(sam_state_dict, rank, fused_attention)
        self.prompt_encoder = build_prompt_encoder(self.input_config)
        self.prompt_encoder.load_state_dict(sub_state_dict(sam_state_dict, "prompt_encoder."))
        self.prompt_encoder.requires_grad_(False).no_mask_embed.requires_grad_(True)
        self.mask_decoder = build_mask_decoder(replace(config, num_mask_tokens=num_classes), PerClassMaskDecoder)
        decoder_weights = {k: v for k, v in sub_state_dict(sam_state_dict, "mask_decoder.").items()
                           if not k.startswith(CLASS_DEPENDENT_DECODER_PARTS)}
        missing, _ = self.mask_decoder.load_state_dict(decoder_weights, strict=False)
        if not all(key.startswith("seg_layers.") for key in missing):
            raise SAMCheckpointError(f"the SAM file lacks mask decoder entries: {[k for k in missing if not k.startswith('seg_layers.')]}")
        self.sam_input = UnitRangeInput(num_input_channels, self.input_config.img_size, intensity_windows)
        keep_frozen_sam_weights_out_of_checkpoints(self, sam_state_dict, untrained_state_keys(self), "SAMed", fingerprint)

    def _lora_encoder(self, sam_state_dict, rank: int, fused_attention: bool) -> ImageEncoderViT:
        encoder = build_image_encoder(self.input_config)
        encoder_weights = sub_state_dict(sam_state_dict, "image_encoder.")
        encoder.load_state_dict(resized_encoder_state_dict(encoder_weights, self.sam_config, self.input_config.img_size))
        if fused_attention:
            fuse_encoder_attention(encoder)
        encoder.requires_grad_(False)
        for block in encoder.blocks:
            block.attn.qkv = LoRAQV(block.attn.qkv, rank)
        return encoder

    @classmethod
    def from_sam_checkpoint(cls, path: str, num_input_channels: int, num_classes: int, **kwargs) -> "SAMed":
        """Build from an official-layout SAM file (ViT-B/L/H or smaller); the file decides the size.
        Its fingerprint comes from the fingerprint cache, as DeSAM's."""
        state_dict, fingerprint = load_sam_state_dict_and_fingerprint(path)
        return cls(state_dict, num_input_channels, num_classes, fingerprint=fingerprint, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×C×H×W → logits B×K×H×W (the decoder's 4G×4G masks resized bilinearly)."""
        embeddings = self.image_encoder(self.sam_input(x))
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)  # 1×0×D, 1×D×G×G
        masks = decode_each_image(self.mask_decoder, embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)[:, 0]
        return F.interpolate(masks, size=x.shape[2:], mode="bilinear", align_corners=False)
