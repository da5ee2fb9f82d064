"""DeSAM: frozen SAM encoders + PRIM + PDMM, with nnU-Net's network contract.

``forward(x)`` takes a z-scored patch B×C×H×W and returns logits B×K×H×W (a list [full, half]
resolution with deep supervision on), so nnU-Net's trainer, sliding-window predictor and
evaluation use it unchanged. Everything SAM needs happens inside:

1. **SAM input** (:mod:`~nnunetv2_desam.networks.sam_input`): a fixed window of nnU-Net's
   normalised intensities → 0–255 (the same map for every tile and slice of a case, so nnU-Net's
   intensity augmentations reach the encoder), channels → RGB through a fixed mixing matrix,
   SAM's longest-side resize to the encoder input (1024, LiteMedSAM 256; aspect ratio kept,
   padded), the pixel normalisation the encoder was pretrained with (SAM's; [0, 1] for LiteMedSAM).
2. **Encoder**, frozen, of the checkpoint's family (ViT-B/L/H, MobileSAM, LiteMedSAM): three taps
   and the image embedding (``sam_backbone.build_backbone``).
3. **Prompts.** Automatic: the whole-image box (``prompt_mode="box"``, DeSAM-B) or an N×N point
   grid (``prompt_mode="points"``, DeSAM-P). Training passes explicit point prompts.
4. **Size back.** PDMM's output (256², a quarter of a 1024 input) returns to H×W like SAM's
   ``postprocess_masks``: upsampled to the encoder input, padding cropped, resized.

**Combining grid prompts** (``settings.grid_aggregation``, see ``grid_aggregation``): by default a
prompt counts for foreground class k only if its predicted IoU for k is > 0.5, the kept prompts'
class probabilities are averaged, and a tile where none passes is background. The result is
returned as log-probabilities, whose softmax is the combined segmentation.
"""

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nnunetv2_desam.networks.fast_attention import fuse_encoder_attention
from nnunetv2_desam.networks.grid_aggregation import IOU_THRESHOLD, GridAggregator, check_grid_aggregation
from nnunetv2_desam.networks.fingerprint_cache import load_sam_state_dict_and_fingerprint
from nnunetv2_desam.networks.frozen_sam_weights import keep_frozen_sam_weights_out_of_checkpoints, recorded_fingerprint
from nnunetv2_desam.networks.pdmm import PDMM
from nnunetv2_desam.networks.prim import PRIM
from nnunetv2_desam.networks.prompts import grid_points
from nnunetv2_desam.networks.sam_input import SAMInput, pixel_statistics
from nnunetv2_desam.networks.sam_backbone import build_backbone
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_prompt_encoder, sub_state_dict

FROZEN_MODULES = ("image_encoder", "prompt_encoder")
PROMPT_CHUNK_SIZE = 27  # image·prompt pairs per PRIM/PDMM pass, whatever the batch: a third of the 9×9 grid
# CPU bf16 by default from this encoder input size on (LiteMedSAM's 256²; a 128² random test SAM's step is 30 % slower in bf16)
CPU_BF16_MIN_INPUT_SIZE = 256


@dataclass(frozen=True)
class DeSAMSettings:
    """Which DeSAM: the prompt mode and the paper's Table 1 ablation switches (``prompt_mode="none"``: PDMM alone, no PRIM)."""

    prompt_mode: str = "points"
    use_prim: bool = True
    use_iou_head: bool = True
    fuse_mask_embedding: bool = True
    grid_size: int = 9
    grid_aggregation: str = "gated"

    def __post_init__(self):
        if self.prompt_mode not in ("points", "box", "none"):
            raise ValueError(f"prompt_mode must be 'points', 'box' or 'none', got {self.prompt_mode!r}")
        if (self.prompt_mode == "none") != (not self.use_prim):
            raise ValueError("prompt_mode 'none' goes with use_prim=False: without PRIM no prompt reaches the network")
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


class DeSAM(nn.Module):
    """The DeSAM network. Build it with :meth:`from_sam_checkpoint`.

    Only PRIM and PDMM (``prim``, ``decoder``) train. The SAM encoders are frozen, stay in eval
    mode and are left out of ``state_dict()``: trained checkpoints are slim and record the SAM
    weights' fingerprint instead, which loading checks against the SAM file in use.

    The two speed-ups keep their plain versions as test oracles and benchmark baselines:
    ``fused_attention`` (SDPA with the relative-position bias folded in, see ``fast_attention``;
    off = segment_anything's own attention), ``prompt_shared_decoding`` (PDMM's image-only
    branches run once per image, not once per grid prompt) and ``skip_gated_off_prompts`` (under
    the ``gated`` and ``authors`` rules PDMM decodes only the grid prompts whose predicted IoU
    passes 0.5: the others cannot change the result, see :func:`prompts_that_count`). On CPUs with
    native bf16 the encoder, PRIM and PDMM run under bf16 autocast in training and inference, as
    nnU-Net autocasts to fp16 on CUDA (``cpu_bf16``, see :func:`cpu_bf16_autocast`; off = fp32, the
    reference; by default on for encoders of at least 256² input, every published SAM, and off for
    the tests' tiny random ones, where the casts cost more than bf16 saves); the SAM input, the
    grid's combination and the outputs stay fp32. Grid prompts go through PRIM and PDMM
    ``prompt_chunk_size`` image·prompt pairs at a time, which bounds memory for any grid
    and batch size. ``intensity_windows``: one (low, high) of nnU-Net's normalised units per input
    channel (:func:`~nnunetv2_desam.networks.sam_input.intensity_windows` reads them off the plans).
    """

    def __init__(
        self,
        sam_state_dict: Dict[str, torch.Tensor],
        num_input_channels: int,
        num_classes: int,
        settings: DeSAMSettings = DeSAMSettings(),
        prompt_shared_decoding: bool = True,
        fused_attention: bool = True,
        skip_gated_off_prompts: bool = True,
        cpu_bf16: Optional[bool] = None,
        prompt_chunk_size: int = PROMPT_CHUNK_SIZE,
        intensity_windows: Optional[Sequence[Tuple[float, float]]] = None,
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
        self.skip_gated_off_prompts = skip_gated_off_prompts
        self.cpu_bf16 = config.img_size >= CPU_BF16_MIN_INPUT_SIZE if cpu_bf16 is None else cpu_bf16
        self.prompt_chunk_size = prompt_chunk_size
        self.image_encoder = build_backbone(config, sam_state_dict)
        if fused_attention and config.family == "vit":
            fuse_encoder_attention(self.image_encoder.encoder)
        self.prompt_encoder = build_prompt_encoder(config)
        self.prompt_encoder.load_state_dict(sub_state_dict(sam_state_dict, "prompt_encoder."))
        for name in FROZEN_MODULES:
            getattr(self, name).requires_grad_(False).eval()

        self.prim: Optional[PRIM] = None
        if settings.use_prim:
            self.prim = PRIM(config, num_classes - 1 if settings.use_iou_head else 0)
            self.prim.load_sam_mask_decoder(sam_state_dict)
        backbone = self.image_encoder
        self.decoder = PDMM(backbone.tap_channels, backbone.tap_grids, config.prompt_embed_dim, num_classes, settings.fuse_mask_embedding)

        self.sam_input = SAMInput(num_input_channels, config.img_size, intensity_windows, pixel_statistics(config))
        frozen_keys = [key for key in self.state_dict() if key.startswith(tuple(f"{m}." for m in FROZEN_MODULES))]
        keep_frozen_sam_weights_out_of_checkpoints(self, sam_state_dict, frozen_keys, "DeSAM", fingerprint)

    @classmethod
    def from_sam_checkpoint(cls, path: str, num_input_channels: int, num_classes: int, **kwargs) -> "DeSAM":
        """Build from a SAM file (ViT-B/L/H or smaller, MobileSAM, LiteMedSAM); the file decides the encoder.

        The file's fingerprint is hashed once and then read from a cache while the file is unchanged
        (:mod:`~nnunetv2_desam.networks.fingerprint_cache`).
        """
        state_dict, fingerprint = load_sam_state_dict_and_fingerprint(path)
        return cls(state_dict, num_input_channels, num_classes, fingerprint=fingerprint, **kwargs)

    @property
    def fingerprint(self) -> str:
        return recorded_fingerprint(self)

    def train(self, mode: bool = True) -> "DeSAM":
        super().train(mode)
        for name in FROZEN_MODULES:
            getattr(self, name).eval()
        return self

    def encode_image(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Patch B×C×H×W → the frozen encoder's taps and embedding (float32 whatever the autocast inside)."""
        images = self.sam_input(x)
        with self.autocast(x.device):
            taps, embedding = self.image_encoder(images)
        return [t.float() for t in taps], embedding.float()

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
        ``settings.prompt_mode``: the whole-image box (0, 0, W, H) or the N×N grid.

        Coordinates are continuous: pixel (row i, column j) covers [j, j+1) × [i, i+1), its centre
        is (j + 0.5, i + 0.5). SAM's prompt encoder adds half a pixel to points and box corners
        (it expects pixel indices), so both are passed to it half a pixel lower: the whole-image
        box reaches SAM as exactly the resized patch, (0, 0, w', h').
        """
        device = self.sam_input.pixel_mean.device
        if boxes is None and points is None:
            if self.settings.prompt_mode == "box":
                height, width = patch_size
                boxes = torch.tensor([[0.0, 0.0, width, height]], device=device).expand(batch, 4)
            else:
                points = grid_points(self.settings.grid_size, patch_size).to(device).expand(batch, -1, -1)
        if boxes is not None:
            corners = self.sam_input.to_encoder_coordinates(boxes.reshape(-1, 2, 2), patch_size) - 0.5
            sparse, dense = self.prompt_encoder(points=None, boxes=corners.reshape(-1, 4), masks=None)
            return sparse, dense, 1
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.int64, device=device)
        coordinates = self.sam_input.to_encoder_coordinates(points, patch_size).reshape(-1, 1, 2) - 0.5
        sparse, dense = self.prompt_encoder(points=(coordinates, point_labels.reshape(-1, 1)), boxes=None, masks=None)
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
            taps, embedding = self.encode_image(x)
        iou = None
        if self.prim is None:
            with self.autocast(x.device):
                outputs = [o.float() for o in _as_list(self.decoder(taps))]
        else:
            with torch.no_grad():
                sparse, dense, prompts_per_image = self.encode_prompts(batch, (height, width), points, point_labels, boxes)
            outputs, iou = self._decode_prompts(taps, embedding, sparse, dense, prompts_per_image)
        sizes = [(height, width), (round(height / 2), round(width / 2))]
        outputs = [self.sam_input.to_patch(o, (height, width), s) for o, s in zip(outputs, sizes)]
        result = outputs if self.decoder.deep_supervision else outputs[0]
        return result if points is None and boxes is None else (result, iou)

    def _decode_prompts(self, taps, embedding, sparse, dense, prompts_per_image: int) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """PRIM + PDMM for P prompts per image → outputs (a list: [full] or [full, half]) and IoU B×P×(K-1) or None.

        One prompt per image gives its logits. More are combined by ``settings.grid_aggregation``
        into log-probabilities B×K×h×w, in passes of at most ``prompt_chunk_size`` image·prompt
        pairs (:func:`prompt_passes`), so that memory grows neither with the grid nor with the
        batch: PRIM and PDMM hold (pairs)×D×G×G and (pairs)×D/4×4G×4G tensors.
        """
        batch, device = embedding.shape[0], embedding.device
        with self.autocast(device):
            features = self.decoder.encode_taps(taps) if self.prompt_shared_decoding else None
        dense_pe = self.prompt_encoder.get_dense_pe()
        if prompts_per_image == 1:
            with self.autocast(device):
                mask_embedding, iou = self.prim(embedding, dense_pe, sparse, dense)
                outputs = _as_list(self._decode(taps, features, mask_embedding, 1))
            return [o.float() for o in outputs], None if iou is None else iou.float().view(batch, 1, -1)
        sparse, dense = (t.unflatten(0, (batch, prompts_per_image)) for t in (sparse, dense))
        aggregators, ious = None, None
        for images, prompts in prompt_passes(batch, prompts_per_image, self.prompt_chunk_size):
            pass_sparse, pass_dense = (t[images, prompts] for t in (sparse, dense))
            count = pass_sparse.shape[1]
            pass_features = None if features is None else [f[images] for f in features]
            with self.autocast(device):
                mask_embedding, iou = self.prim(embedding[images], dense_pe, pass_sparse.flatten(0, 1), pass_dense.flatten(0, 1))
                iou = None if iou is None else iou.float().view(-1, count, iou.shape[-1])
                logits = self._decode_counting_prompts([t[images] for t in taps], pass_features, mask_embedding, iou, count)
            logits = [output.float() for output in logits]
            if aggregators is None:
                aggregators = [GridAggregator(self.settings.grid_aggregation, batch, prompts_per_image) for _ in logits]
                ious = None if iou is None else iou.new_zeros(batch, prompts_per_image, iou.shape[-1])
            for aggregator, output in zip(aggregators, logits):
                aggregator.add(images, prompts, output, iou)
            if iou is not None:
                ious[images, prompts] = iou
        return [aggregator.result() for aggregator in aggregators], ious

    def autocast(self, device: torch.device):
        """The context the encoder, PRIM and PDMM run in: bf16 autocast on a CPU with native bf16 if ``cpu_bf16``."""
        return cpu_bf16_autocast(device, self.cpu_bf16)

    def _decode_counting_prompts(self, taps, features, mask_embedding, iou, prompts_per_image) -> List[torch.Tensor]:
        """PDMM for n images × P prompts → logits [(n·P)×K×h×w, …], decoding only the prompts that can count.

        With ``skip_gated_off_prompts`` and a gating rule, the prompts that :func:`prompts_that_count` rules
        out get zero logits instead of PDMM's (the rule ignores them); PDMM, the grid's dominant cost,
        runs image by image on the others.
        """
        counting = prompts_that_count(iou, self.settings.grid_aggregation) if self.skip_gated_off_prompts else None
        if counting is None or bool(counting.all()):
            return _as_list(self._decode(taps, features, mask_embedding, prompts_per_image))
        sides = self.decoder.output_sides(mask_embedding.shape[-1])
        outputs = [mask_embedding.new_zeros(counting.numel(), self.num_classes, side, side, dtype=torch.float32) for side in sides]
        for image, rows in enumerate(counting):
            kept = rows.nonzero().flatten()
            if len(kept) == 0:
                continue
            image_features = None if features is None else [f[image: image + 1] for f in features]
            decoded = self._decode([t[image: image + 1] for t in taps], image_features,
                                   mask_embedding[image * prompts_per_image + kept], len(kept))
            for output, part in zip(outputs, _as_list(decoded)):
                output[image * prompts_per_image + kept] = part.float()  # PDMM's output is bf16 (fp16) under autocast
        return outputs

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


def prompts_that_count(iou: Optional[torch.Tensor], rule: str) -> Optional[torch.Tensor]:
    """n×P bool: the grid prompts whose PDMM output the rule can use, from IoUs n×P×(K-1); None: all of them.

    ``gated`` ignores a prompt whose IoU is ≤ 0.5 for every class (it votes for none), ``authors`` one whose
    first IoU is ≤ 0.5 (it is dropped before NMS); ``mean`` weights every prompt, and without an IoU head
    every prompt votes.
    """
    if iou is None or rule == "mean":
        return None
    passed = iou.float() > IOU_THRESHOLD
    return passed.any(-1) if rule == "gated" else passed[..., 0]


def cpu_bf16_autocast(device: torch.device, cpu_bf16: bool):
    """bf16 autocast on a CPU with native bf16 (oneDNN's AVX512-BF16/AMX kernels), if ``cpu_bf16``; elsewhere
    nothing (on CUDA nnU-Net's own autocast already covers the whole forward)."""
    enabled = cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


@lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _as_list(outputs) -> List[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

