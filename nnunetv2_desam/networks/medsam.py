"""MedSAM (Ma et al., Nature Communications 2024): SAM's image encoder and mask decoder fine-tuned on box prompts.

As the authors' code (``bowang-lab/MedSAM``: ``train_one_gpu.py``, ``train_multi_gpus.py``,
``MedSAM_Inference.py``, ``utils/ckpt_convert.py``) runs it: 1024×1024 RGB input in [0, 1] without
SAM's pixel normalisation; the image encoder and mask decoder train, the prompt encoder is frozen;
one box gives one binary mask, the decoder's first mask token (``multimask_output=False``),
sigmoid; loss Dice + BCE. The released ``medsam_vit_b.pth`` is a plain state dict in SAM ViT-B's
key layout (``ckpt_convert.py`` writes MedSAM's weights under SAM's keys), so
:func:`~nnunetv2_desam.networks.sam_checkpoint.load_sam_state_dict` reads it like any SAM file.

**Automatic prompts, several classes.** The prompt is the whole-image box, and the decoder runs
once per foreground class. The same box for every class would give every class the same mask, so
pass k adds a learned offset c_k to the box's two corner tokens. The offsets start at zero: before
training every pass is MedSAM's own whole-image-box prediction.

**Combination rule.** With p_k = sigmoid(z_k) the binary probability of foreground class k, the
background scores b = Π_k (1 − p_k). The network returns the log-scores
[Σ_k log(1 − p_k), log p_1, …, log p_{K−1}]; their softmax (what nnU-Net's predictor applies) is
[b, p_1, …] normalised to sum 1, and their argmax picks the class whose probability beats every
other class and the background score. With one foreground class this is exactly MedSAM's
[1 − p, p] and its 0.5 threshold.
"""

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunetv2_desam.networks.fast_attention import fuse_encoder_attention
from nnunetv2_desam.networks.sam_checkpoint import (
    SAMConfig,
    build_image_encoder,
    build_mask_decoder,
    build_prompt_encoder,
    image_encoder_state_dict,
    load_sam_state_dict,
    sub_state_dict,
)
from nnunetv2_desam.networks.tinyvit_encoder import tokens_to_grid
from nnunetv2_desam.networks.sam_finetuning import UnitRangeInput, decode_each_image

SAM_MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")
LOG_HALF = -math.log(2.0)


class ClassPrompts(nn.Module):
    """One learned offset per foreground class, added to the box prompt's tokens: 1×T×D → (K−1)×T×D.

    The offsets are class-dependent, so they are ``seg_layers`` (nnU-Net's ``-pretrained_weights``
    does not transfer them).
    """

    def __init__(self, num_foreground_classes: int, dim: int):
        super().__init__()
        self.seg_layers = nn.Embedding(num_foreground_classes, dim)
        nn.init.zeros_(self.seg_layers.weight)

    def forward(self, box_tokens: torch.Tensor) -> torch.Tensor:
        return box_tokens + self.seg_layers.weight[:, None, :]


def per_class_log_scores(logits: torch.Tensor) -> torch.Tensor:
    """Per-class binary logits B×(K−1)×… → log-scores B×K×… of the combination rule (module docstring)."""
    logits = logits.float()
    return torch.cat([F.logsigmoid(-logits).sum(1, keepdim=True), F.logsigmoid(logits)], dim=1)


def binary_logits(log_scores: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`per_class_log_scores` on the foreground channels: B×K×… → z B×(K−1)×….

    z_k = log p_k − log(1 − p_k); exact in fp32 for |z_k| up to about 87 (log p_k is kept below
    zero, where larger z_k would round it).
    """
    log_p = log_scores[:, 1:].float().clamp(max=-torch.finfo(torch.float32).tiny)
    return log_p - _log1mexp(log_p)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(a)) for a < 0, accurate on both sides of −log 2 (Mächler 2012); no inf in either branch."""
    near_zero = a > LOG_HALF
    upper = torch.log(-torch.expm1(torch.where(near_zero, a, LOG_HALF)))
    lower = torch.log1p(-torch.exp(torch.where(near_zero, LOG_HALF, a)))
    return torch.where(near_zero, upper, lower)


class PerClassDiceBCELoss(nn.Module):
    """MedSAM's Dice + BCE for every foreground class's binary mask, from the network's log-scores.

    ``dice_and_bce`` is nnU-Net's ``DC_and_BCE_loss`` (sigmoid Dice with background channel kept,
    BCE with logits); it gets the per-class logits and one-hot targets B×(K−1)×H×W, plus the
    ignore mask as last channel when the dataset has an ignore label.
    """

    def __init__(self, dice_and_bce: nn.Module, num_classes: int, ignore_label: Optional[int]):
        super().__init__()
        self.dice_and_bce = dice_and_bce
        self.num_classes = num_classes
        self.ignore_label = ignore_label

    def forward(self, log_scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0]
        channels = [labels == k for k in range(1, self.num_classes)]
        if self.ignore_label is not None:
            channels.append(labels == self.ignore_label)
        return self.dice_and_bce(binary_logits(log_scores), torch.stack(channels, 1))


class MedSAM(nn.Module):
    """The MedSAM network with nnU-Net's contract: B×C×H×W patch → log-scores B×K×H×W.

    Build it with :meth:`from_sam_checkpoint` (weights from a SAM or MedSAM file) or from a
    :class:`SAMConfig` alone (random weights, for loading a trained checkpoint, which holds every
    weight). With ``gradient_checkpointing`` the encoder blocks recompute their activations in the
    backward pass instead of storing them. ``fused_attention`` and ``intensity_windows`` as in DeSAM (off: the reference).
    """

    def __init__(self, config: SAMConfig, num_input_channels: int, num_classes: int,
                 gradient_checkpointing: bool = True, fused_attention: bool = True,
                 intensity_windows: Optional[Sequence[Tuple[float, float]]] = None):
        super().__init__()
        self.sam_config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.image_encoder = build_image_encoder(config)
        if fused_attention and config.family == "vit":
            fuse_encoder_attention(self.image_encoder)
        self.prompt_encoder = build_prompt_encoder(config).requires_grad_(False)
        self.mask_decoder = build_mask_decoder(config)
        self.mask_decoder.iou_prediction_head.requires_grad_(False)  # its output never reaches MedSAM's loss
        self.class_prompts = ClassPrompts(num_classes - 1, config.prompt_embed_dim)
        self.sam_input = UnitRangeInput(num_input_channels, config.img_size, intensity_windows)

    @classmethod
    def from_sam_state_dict(cls, sam_state_dict: Dict[str, torch.Tensor], num_input_channels: int, num_classes: int, **kwargs) -> "MedSAM":
        network = cls(SAMConfig.from_state_dict(sam_state_dict), num_input_channels, num_classes, **kwargs)
        network.image_encoder.load_state_dict(image_encoder_state_dict(sam_state_dict))
        for name in SAM_MODULES[1:]:
            getattr(network, name).load_state_dict(sub_state_dict(sam_state_dict, name + "."))
        return network

    @classmethod
    def from_sam_checkpoint(cls, path: str, num_input_channels: int, num_classes: int, **kwargs) -> "MedSAM":
        """Build from an official-layout SAM file or MedSAM's ``medsam_vit_b.pth``; the file decides the size."""
        return cls.from_sam_state_dict(load_sam_state_dict(path), num_input_channels, num_classes, **kwargs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder pass, block by block (TinyViT: stage by stage): B×3×S×S → B×D×G×G."""
        encoder = self.image_encoder
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        if self.sam_config.family == "tinyvit":
            x = encoder.patch_embed(images)
            for layer in encoder.layers:
                x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
            return encoder.neck(tokens_to_grid(x, self.sam_config.image_embedding_size))
        x = encoder.patch_embed(images) + encoder.pos_embed
        for block in encoder.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return encoder.neck(x.permute(0, 3, 1, 2))

    def foreground_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×C×H×W → binary logits z B×(K−1)×H×W, one decoder pass per foreground class."""
        embeddings = self.encode(self.sam_input(x))
        size = self.image_encoder.img_size
        with torch.no_grad():
            box = torch.tensor([[0.0, 0.0, size, size]], device=x.device)
            sparse, dense = self.prompt_encoder(points=None, boxes=box, masks=None)  # 1×2×D, 1×D×G×G
        sparse = self.class_prompts(sparse)
        dense = dense.expand(sparse.shape[0], -1, -1, -1)
        masks = decode_each_image(self.mask_decoder, embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)[:, :, 0]
        return F.interpolate(masks, size=x.shape[2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×C×H×W → log-scores B×K×H×W (softmax: the combined segmentation probabilities)."""
        return per_class_log_scores(self.foreground_logits(x))
