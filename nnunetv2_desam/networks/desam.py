"""DeSAM: frozen SAM encoders + PRIM + PDMM, with nnU-Net's network contract.

``forward(x)`` takes a z-scored patch B×C×H×W and returns logits B×K×H×W (a list [full, half]
resolution with deep supervision on), so nnU-Net's trainer, sliding-window predictor and
evaluation use it unchanged. Everything SAM needs happens inside:

1. **Channels.** C input channels become SAM's three through a fixed mixing matrix: with C < 3
   the channels repeat cyclically (1 channel → grey RGB); with C ≥ 3 SAM channel i is the mean of
   the i-th of three contiguous channel groups. Fixed, so no gradient ever has to cross the
   frozen encoder.
2. **Intensities.** Per sample and channel, the 0.5–99.5 percentile range is mapped to 0–255
   (what the authors do per volume) and SAM's pixel mean/std normalisation applied.
3. **Size.** The patch is resized (bilinear) to the encoder's square input, e.g. 1024×1024; the
   PDMM output (a quarter of that) is resized back to H×W.
4. **Prompts.** Automatic: the whole-image box (``prompt_mode="box"``, DeSAM-B) or an N×N point
   grid (``prompt_mode="points"``, DeSAM-P). Training passes explicit point prompts.

**Combining grid prompts** (``settings.grid_aggregation``, see ``grid_aggregation``): by default a
prompt counts for foreground class k only if its predicted IoU for k is > 0.5, the kept prompts'
class probabilities are averaged, and a tile where none passes is background. The result is
returned as log-probabilities, whose softmax is the combined segmentation.
"""

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_desam.networks.fast_attention import fuse_encoder_attention
from nnunetv2_desam.networks.grid_aggregation import GridAggregator, check_grid_aggregation
from nnunetv2_desam.networks.fingerprint_cache import load_sam_state_dict_and_fingerprint
from nnunetv2_desam.networks.pdmm import PDMM
from nnunetv2_desam.networks.prim import PRIM
from nnunetv2_desam.networks.prompts import grid_points
from nnunetv2_desam.networks.sam_backbone import SAMBackbone
from nnunetv2_desam.networks.sam_checkpoint import (
    SAMCheckpointError,
    SAMConfig,
    build_image_encoder,
    build_prompt_encoder,
    sam_fingerprint,
    sub_state_dict,
)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
FROZEN_MODULES = ("image_encoder", "prompt_encoder")
PROMPT_CHUNK_SIZE = 27  # image·prompt pairs per PRIM/PDMM pass, whatever the batch: a third of the 9×9 grid


@dataclass(frozen=True)
class DeSAMSettings:
    """Which DeSAM: the prompt mode and the paper's Table 1 ablation switches."""

    prompt_mode: str = "points"
    use_prim: bool = True
    use_iou_head: bool = True
    fuse_mask_embedding: bool = True
    grid_size: int = 9
    grid_aggregation: str = "gated"

    def __post_init__(self):
        if self.prompt_mode not in ("points", "box"):
            raise ValueError(f"prompt_mode must be 'points' or 'box', got {self.prompt_mode!r}")
        if self.prompt_mode == "box" and self.use_iou_head:
            raise ValueError("box mode has a single prompt per image: it has no IoU head (use_iou_head=False)")
        if not self.use_prim and (self.use_iou_head or self.fuse_mask_embedding):
            raise ValueError("without PRIM there is neither an IoU head nor mask-embedding fusion")
        if self.use_prim and not (self.use_iou_head or self.fuse_mask_embedding):
            raise ValueError("PRIM without IoU head and without mask-embedding fusion would be unused")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be at least 1, got {self.grid_size}")
        check_grid_aggregation(self.grid_aggregation)

    @property
    def uses_grid(self) -> bool:
        """Whether automatic prompts are a point grid that ``grid_aggregation`` combines."""
        return self.prompt_mode == "points" and self.use_prim

    def to_dict(self) -> dict:
        return asdict(self)


def channel_mixing_matrix(num_input_channels: int) -> torch.Tensor:
    """3×C matrix mapping C input channels to SAM's RGB (see the module docstring)."""
    mixing = torch.zeros(3, num_input_channels)
    if num_input_channels < 3:
        for rgb in range(3):
            mixing[rgb, rgb % num_input_channels] = 1.0
    else:
        for rgb, group in enumerate(np.array_split(np.arange(num_input_channels), 3)):
            mixing[rgb, group] = 1.0 / len(group)
    return mixing


class DeSAM(nn.Module):
    """The DeSAM network. Build it with :meth:`from_sam_checkpoint`.

    Only PRIM and PDMM (``prim``, ``decoder``) train. The SAM encoders are frozen, stay in eval
    mode and are left out of ``state_dict()``: trained checkpoints are slim and record the SAM
    weights' fingerprint instead, which loading checks against the SAM file in use.

    The two speed-ups keep their plain versions as test oracles and benchmark baselines:
    ``fused_attention`` (SDPA with the relative-position bias folded in, see ``fast_attention``;
    off = segment_anything's own attention) and ``prompt_shared_decoding`` (PDMM's image-only
    branches run once per image, not once per grid prompt). Grid prompts go through PRIM and
    PDMM ``prompt_chunk_size`` image·prompt pairs at a time, which bounds memory for any grid
    and batch size.
    """

    def __init__(
        self,
        sam_state_dict: Dict[str, torch.Tensor],
        num_input_channels: int,
        num_classes: int,
        settings: DeSAMSettings = DeSAMSettings(),
        prompt_shared_decoding: bool = True,
        fused_attention: bool = True,
        prompt_chunk_size: int = PROMPT_CHUNK_SIZE,
        fingerprint: Optional[str] = None,
    ):
        super().__init__()
        if settings.uses_grid:
            check_grid_aggregation(settings.grid_aggregation, num_classes)
        config = SAMConfig.from_state_dict(sam_state_dict)
        self.settings = settings
        self.sam_config = config
        self.num_classes = num_classes
        self.prompt_shared_decoding = prompt_shared_decoding
        self.prompt_chunk_size = prompt_chunk_size
        self.image_encoder = SAMBackbone(build_image_encoder(config), config.encoder_global_attn_indexes)
        self.image_encoder.encoder.load_state_dict(sub_state_dict(sam_state_dict, "image_encoder."))
        if fused_attention:
            fuse_encoder_attention(self.image_encoder.encoder)
        self.prompt_encoder = build_prompt_encoder(config)
        self.prompt_encoder.load_state_dict(sub_state_dict(sam_state_dict, "prompt_encoder."))
        for name in FROZEN_MODULES:
            getattr(self, name).requires_grad_(False).eval()

        self.prim: Optional[PRIM] = None
        if settings.use_prim:
            self.prim = PRIM(config, num_classes - 1 if settings.use_iou_head else 0)
            self.prim.load_sam_mask_decoder(sam_state_dict)
        self.decoder = PDMM(config.encoder_embed_dim, config.prompt_embed_dim, num_classes, settings.fuse_mask_embedding)

        self.register_buffer("channel_mixing", channel_mixing_matrix(num_input_channels), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        digest = bytes.fromhex(fingerprint or sam_fingerprint(sam_state_dict))  # known already when read from a file
        self.register_buffer("sam_fingerprint", torch.tensor(list(digest), dtype=torch.uint8))
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_check_and_complete_frozen_weights)

    @classmethod
    def from_sam_checkpoint(cls, path: str, num_input_channels: int, num_classes: int, **kwargs) -> "DeSAM":
        """Build from an official-layout SAM file (ViT-B/L/H or smaller); the file decides the size.

        The file's fingerprint is hashed once and then read from a cache while the file is unchanged
        (:mod:`~nnunetv2_desam.networks.fingerprint_cache`).
        """
        state_dict, fingerprint = load_sam_state_dict_and_fingerprint(path)
        return cls(state_dict, num_input_channels, num_classes, fingerprint=fingerprint, **kwargs)

    @property
    def fingerprint(self) -> str:
        return bytes(self.sam_fingerprint.cpu().tolist()).hex()

    def train(self, mode: bool = True) -> "DeSAM":
        super().train(mode)
        for name in FROZEN_MODULES:
            getattr(self, name).eval()
        return self

    def to_sam_input(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W z-scored patch → B×3×S×S SAM-normalised image."""
        x = x.float()
        flat = x.flatten(2)
        low, high = torch.quantile(flat, torch.tensor([0.005, 0.995], device=x.device), dim=-1, keepdim=True)
        scaled = 255.0 * ((flat - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)
        rgb = torch.einsum("rc,bcn->brn", self.channel_mixing, scaled).view(x.shape[0], 3, *x.shape[2:])
        size = self.image_encoder.img_size
        rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
        return (rgb - self.pixel_mean) / self.pixel_std

    def encode_prompts(
        self,
        batch: int,
        patch_size: Tuple[int, int],
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Prompts in patch pixels → SAM's sparse (B·P)×T×D and dense (B·P)×D×G×G embeddings, and P.

        Explicit boxes (B×4, x0 y0 x1 y1) or points (B×P×2 with labels B×P, default 1 =
        foreground; each point its own prompt) win; otherwise the automatic prompt of
        ``settings.prompt_mode``: the whole-image box or the N×N grid.
        """
        height, width = patch_size
        device = self.channel_mixing.device
        scale = torch.tensor([self.image_encoder.img_size / width, self.image_encoder.img_size / height], device=device)
        if boxes is None and points is None:
            if self.settings.prompt_mode == "box":
                boxes = torch.tensor([[0.0, 0.0, width, height]], device=device).expand(batch, 4)
            else:
                points = grid_points(self.settings.grid_size, patch_size).to(device).expand(batch, -1, -1)
        if boxes is not None:
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes.float() * scale.repeat(2), masks=None)
            return sparse, dense, 1
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.int64, device=device)
        coordinates = (points.float() * scale).reshape(-1, 1, 2)
        # SAM's prompt encoder adds half a pixel: our coordinates are continuous already.
        sparse, dense = self.prompt_encoder(points=(coordinates - 0.5, point_labels.reshape(-1, 1)), boxes=None, masks=None)
        return sparse, dense, points.shape[1]

    def forward(
        self,
        x: torch.Tensor,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, List[torch.Tensor], Tuple]:
        """
        Args:
            x: B×C×H×W patch.
            points, point_labels, boxes: optional explicit prompts in continuous pixel coordinates
                of the patch (see :meth:`encode_prompts`); training passes one point per sample.
        Returns:
            automatic prompts: logits B×K×H×W ([B×K×H×W, B×K×H/2×W/2] with deep supervision);
            explicit prompts: (those logits, combined over the P prompts; IoU predictions
            B×P×(K-1), or None without IoU head).
        """
        batch, _, height, width = x.shape
        with torch.no_grad():
            taps, embedding = self.image_encoder(self.to_sam_input(x))
        iou = None
        if self.prim is None:
            outputs = _as_list(self.decoder(taps))
        else:
            with torch.no_grad():
                sparse, dense, prompts_per_image = self.encode_prompts(batch, (height, width), points, point_labels, boxes)
            outputs, iou = self._decode_prompts(taps, embedding, sparse, dense, prompts_per_image)
        sizes = [(height, width), (round(height / 2), round(width / 2))]
        outputs = [F.interpolate(o, size=s, mode="bilinear", align_corners=False) for o, s in zip(outputs, sizes)]
        result = outputs if self.decoder.deep_supervision else outputs[0]
        return result if points is None and boxes is None else (result, iou)

    def _decode_prompts(self, taps, embedding, sparse, dense, prompts_per_image: int) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """PRIM + PDMM for P prompts per image → outputs (a list: [full] or [full, half]) and IoU B×P×(K-1) or None.

        One prompt per image gives its logits. More are combined by ``settings.grid_aggregation``
        into log-probabilities B×K×h×w, in passes of at most ``prompt_chunk_size`` image·prompt
        pairs (:func:`prompt_passes`), so that memory grows neither with the grid nor with the
        batch: PRIM and PDMM hold (pairs)×D×G×G and (pairs)×D/4×4G×4G tensors.
        """
        batch = embedding.shape[0]
        features = self.decoder.encode_taps(taps) if self.prompt_shared_decoding else None
        dense_pe = self.prompt_encoder.get_dense_pe()
        if prompts_per_image == 1:
            mask_embedding, iou = self.prim(embedding, dense_pe, sparse, dense)
            return _as_list(self._decode(taps, features, mask_embedding, 1)), None if iou is None else iou.view(batch, 1, -1)
        sparse, dense = (t.unflatten(0, (batch, prompts_per_image)) for t in (sparse, dense))
        aggregators, ious = None, None
        for images, prompts in prompt_passes(batch, prompts_per_image, self.prompt_chunk_size):
            pass_sparse, pass_dense = (t[images, prompts] for t in (sparse, dense))
            count = pass_sparse.shape[1]
            mask_embedding, iou = self.prim(embedding[images], dense_pe, pass_sparse.flatten(0, 1), pass_dense.flatten(0, 1))
            iou = None if iou is None else iou.view(-1, count, iou.shape[-1])
            pass_features = None if features is None else [f[images] for f in features]
            logits = _as_list(self._decode([t[images] for t in taps], pass_features, mask_embedding, count))
            if aggregators is None:
                aggregators = [GridAggregator(self.settings.grid_aggregation, batch, prompts_per_image) for _ in logits]
                ious = None if iou is None else iou.new_zeros(batch, prompts_per_image, iou.shape[-1])
            for aggregator, output in zip(aggregators, logits):
                aggregator.add(images, prompts, output, iou)
            if iou is not None:
                ious[images, prompts] = iou
        return [aggregator.result() for aggregator in aggregators], ious

    def _decode(self, taps, features, mask_embedding, prompts_per_image):
        """PDMM per prompt; image-only ``features`` (PDMM.encode_taps) are shared across prompts, or
        with ``prompt_shared_decoding`` off the taps are repeated for every prompt."""
        if self.prompt_shared_decoding:
            return self.decoder.decode(features, mask_embedding, prompts_per_image)
        repeated_taps = [t.repeat_interleave(prompts_per_image, dim=0) for t in taps]
        return self.decoder(repeated_taps, mask_embedding)


def prompt_passes(batch: int, prompts_per_image: int, pairs_per_pass: int) -> List[Tuple[slice, slice]]:
    """(images, prompts) slices of the PRIM/PDMM passes over B images × P prompts, ≤ ``pairs_per_pass`` pairs each.

    Whole images (all P prompts of ⌊pairs/P⌋ images) when the grid fits into a pass, else one
    image's prompts ``pairs_per_pass`` at a time; every pass has the same prompts per image.
    """
    if pairs_per_pass >= prompts_per_image:
        images = pairs_per_pass // prompts_per_image
        return [(slice(start, start + images), slice(None)) for start in range(0, batch, images)]
    return [(slice(image, image + 1), slice(start, start + pairs_per_pass))
            for image in range(batch) for start in range(0, prompts_per_image, pairs_per_pass)]


def _as_list(outputs) -> List[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _drop_frozen_weights(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the frozen SAM weights live in the SAM file, not in our checkpoints."""
    for key in [k for k in state_dict if k.startswith(tuple(f"{prefix}{m}." for m in FROZEN_MODULES))]:
        del state_dict[key]


def _check_and_complete_frozen_weights(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook: refuse weights trained on other SAM weights; keep our frozen ones."""
    key = prefix + "sam_fingerprint"
    if key in state_dict:
        saved = bytes(state_dict[key].cpu().tolist()).hex()
        if saved != module.fingerprint:
            raise SAMCheckpointError(
                f"these DeSAM weights were trained with SAM weights of fingerprint {saved[:16]}…, but the SAM "
                f"checkpoint in use has fingerprint {module.fingerprint[:16]}…: point DESAM_SAM_CHECKPOINT at "
                f"the SAM file used for training"
            )
    for child in FROZEN_MODULES:
        for name, tensor in getattr(module, child).state_dict(prefix=f"{prefix}{child}.", keep_vars=True).items():
            state_dict.setdefault(name, tensor.detach())
