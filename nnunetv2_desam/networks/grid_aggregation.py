"""Grid prompts → one segmentation per image: the rule that combines DeSAM-P's N×N point prompts.

Each image (an nnU-Net patch) gets P = N² point prompts. For prompt i PDMM gives class logits z_i
(K×h×w, K = nnU-Net's segmentation heads, background first; p_i = softmax(z_i)), and PRIM's IoU
head a predicted IoU s_ik for every foreground class k. A rule turns these into scores
B×K×h×w that nnU-Net treats as logits. They are log-probabilities log q: nnU-Net's softmax gives q
back, ``--save_probabilities`` writes q, and the argmax is the rule's segmentation.

Rules (``DeSAMSettings.grid_aggregation``, ``DESAM_GRID_AGGREGATION``):

``gated`` (default): a prompt votes for foreground class k only if s_ik > 0.5 (strictly, like the
    authors' ``pred_iou_thresh``). A class with at least one vote gets q_k = the mean of p_ik over
    its voters; a class without votes gets q_k = 0, so a tile where no prompt passes for any class
    is background. q_0 = max(0, 1 − Σ_k q_k), then q is normalised (this only matters where
    different classes' voters together claim more than everything). Mean of the kept prompts,
    because PDMM is prompt-decoupled: every prompt's output is already the whole segmentation, so
    the kept prompts are several estimates of one map and their mean is an ensemble; a union would
    add up every kept prompt's false positives, and the authors' single best mask discards the
    other estimates and hinges on the ranking of near-equal IoUs. Binary: foreground where the
    passing prompts' mean foreground probability is > 0.5. Overlapping classes: the larger q_k
    wins, ties go to the lower label (argmax). Without an IoU head every prompt votes: plain mean.
``mean``: the IoU-weighted mean, Σ_i w_ik p_ik / Σ_i w_ik with w_ik = clamp(s_ik, 1e-3, 1) and
    the mean weight for the background. Smooth and never empties a tile, but the weights cancel
    where prompts agree: a region that many low-IoU prompts produce survives, and when all prompts
    give the same mask (no mask-embedding fusion) the IoU head changes nothing.
``authors``: the authors' test-time sequence (their ``SamAutomaticMaskGenerator`` with
    ``pred_iou_thresh=0.5``, ``min_mask_region_area=1000``), binary tasks only: keep prompts with
    s_i > 0.5; binarise p_i,fg > 0.5 (their sigmoid > 0.5); boxes by ``batched_mask_to_box``;
    torchvision's ``batched_nms`` at box IoU 0.7 ranked by s_i; in that order remove holes, then
    islands, smaller than A px with ``remove_small_regions``; a second ``batched_nms`` ranks
    unchanged masks before changed ones (SAM's ``postprocess_small_regions``); the first mask
    left is the segmentation (their ``anns[0]``), empty when no prompt passes. A = 1000·h·w/256²:
    their 1000 px apply to 256×256 masks (slices resized to 256²), i.e. 1.5 % of the image; here
    to PDMM's h×w output, which is 256×256 for 1024-input SAM (A = 1000 exactly). Their stability
    filter is commented out in their code (the score is computed, never used) and their crop-edge
    box filter is a no-op with one whole-image crop, so neither is applied. Without an IoU head
    every s_i counts as 1 (as in their box mode). Scores: the mask as log(1 − 1e-8) / log(1e-8).

Overlapping tiles. nnU-Net's sliding window averages the scores of overlapping tiles with Gaussian
weights, i.e. a weighted geometric mean of the tiles' q. A label that every covering tile gives
stays (a weighted mean of score differences that are all ≥ 0 is ≥ 0), and a class gated off in
every covering tile never wins (its score is log 1e-8, the floor, in all of them). Where tiles
disagree, a tile that gated class k off votes against it with log 1e-8 ≈ −18.4, so k survives there
only where the tiles that found it carry clearly more Gaussian weight (near their centres).
"""

import math
from typing import Optional, Tuple

import torch
from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions
from torchvision.ops import batched_nms

from nnunetv2_desam.errors import ConfigurationError

GRID_AGGREGATIONS = ("gated", "mean", "authors")
IOU_THRESHOLD = 0.5
MIN_PROBABILITY = 1e-8
MIN_PROMPT_WEIGHT = 1e-3
AUTHORS_BOX_NMS_THRESHOLD = 0.7
AUTHORS_MIN_REGION_AREA = 1000  # pixels of their 256×256 masks
AUTHORS_MASK_SIZE = 256


def check_grid_aggregation(rule: str, num_classes: Optional[int] = None) -> None:
    """ConfigurationError for an unknown rule, or for ``authors`` with K = ``num_classes`` > 2."""
    if rule not in GRID_AGGREGATIONS:
        raise ConfigurationError(f"grid aggregation must be one of {', '.join(GRID_AGGREGATIONS)}, got {rule!r}")
    if rule == "authors" and num_classes is not None and num_classes != 2:
        raise ConfigurationError(
            f"grid aggregation 'authors' is the authors' binary sequence (one mask per slice) and this task has "
            f"{num_classes - 1} foreground classes; use 'gated' (per-class IoU gating) or 'mean'"
        )


def gated_sums(logits: torch.Tensor, iou: Optional[torch.Tensor], prompts_per_image: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n·P)×K×h×w logits and IoUs n×P×(K-1) (None: all vote) → Σ_i g_ik p_ik (n×(K-1)×h×w) and Σ_i g_ik (n×(K-1)),
    g_ik = [s_ik > 0.5]."""
    foreground = logits.float().softmax(1)[:, 1:].unflatten(0, (-1, prompts_per_image))  # n×P×(K-1)×h×w
    votes = foreground.new_ones(foreground.shape[:3]) if iou is None else (iou.float() > IOU_THRESHOLD).float()
    return torch.einsum("npk,npkhw->nkhw", votes, foreground), votes.sum(1)


def gated_log_probabilities(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`gated_sums` added over all prompts → log q, B×K×h×w (the ``gated`` rule, module docstring)."""
    foreground = sums / counts.clamp_min(1.0)[..., None, None]  # 0 for classes without votes
    background = (1.0 - foreground.sum(1, keepdim=True)).clamp_min(0.0)
    probabilities = torch.cat([background, foreground], dim=1)
    probabilities = probabilities / probabilities.sum(1, keepdim=True)  # the sum is ≥ 1 > 0
    return probabilities.clamp_min(MIN_PROBABILITY).log()


def weighted_probability_sums(logits: torch.Tensor, iou: Optional[torch.Tensor], prompts_per_image: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n·P)×K×h×w logits → Σ_i w_i·softmax(z_i) (n×K×h×w) and Σ_i w_i (n×K×1×1).

    w_ik = clamp(IoU_ik, 1e-3, 1) for foreground class k, their mean for the background; 1 without IoU.
    """
    probabilities = logits.float().softmax(1).unflatten(0, (-1, prompts_per_image))  # n×P×K×h×w
    if iou is None:
        weights = probabilities.new_ones(probabilities.shape[:3])
    else:
        foreground = iou.float().clamp(MIN_PROMPT_WEIGHT, 1.0)  # n×P×(K-1)
        weights = torch.cat([foreground.mean(-1, keepdim=True), foreground], dim=-1)  # n×P×K
    numerator = (weights[..., None, None] * probabilities).sum(1)
    return numerator, weights.sum(1)[..., None, None]


def weighted_mean_log_probabilities(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_probability_sums` added over all prompts → log q, B×K×h×w (the ``mean`` rule)."""
    return (numerator / denominator).clamp_min(MIN_PROBABILITY).log()


def authors_min_region_area(height: int, width: int) -> float:
    """The authors' 1000 px at 256×256, scaled to an h×w mask (the same fraction of the image)."""
    return AUTHORS_MIN_REGION_AREA * height * width / AUTHORS_MASK_SIZE**2


def authors_mask(masks: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """The authors' sequence for one image: binary masks P×h×w (p_fg > 0.5) and IoUs P → the mask h×w (bool)."""
    kept = iou > IOU_THRESHOLD
    masks, iou = masks[kept], iou[kept].float()
    if len(masks) == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    no_category = torch.zeros(len(masks), dtype=torch.int64, device=masks.device)
    order = batched_nms(batched_mask_to_box(masks).float(), iou, no_category, AUTHORS_BOX_NMS_THRESHOLD)
    area = authors_min_region_area(*masks.shape[1:])
    cleaned, unchanged = [], []
    for mask in masks[order].cpu().numpy():
        mask, filled = remove_small_regions(mask, area, mode="holes")
        mask, trimmed = remove_small_regions(mask, area, mode="islands")
        cleaned.append(torch.as_tensor(mask))
        unchanged.append(float(not (filled or trimmed)))
    cleaned = torch.stack(cleaned)
    first = batched_nms(batched_mask_to_box(cleaned).float(), torch.tensor(unchanged), no_category[: len(cleaned)].cpu(), AUTHORS_BOX_NMS_THRESHOLD)[0]
    return cleaned[first].to(masks.device)


def mask_log_probabilities(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks B×h×w → log-probabilities B×2×h×w of that hard segmentation: log 1e-8 for the other
    class, log(1 − 1e-8) (0 in float32) for the mask's own."""
    inside, outside = torch.tensor(0.0, device=masks.device), torch.tensor(math.log(MIN_PROBABILITY), device=masks.device)
    return torch.stack([torch.where(masks, outside, inside), torch.where(masks, inside, outside)], dim=1)


class GridAggregator:
    """Combines the grid prompts of a batch of B images, P prompts each, by ``rule``.

    Per-prompt outputs arrive in passes (:meth:`add`: some images, some of their prompts), so that
    memory is bounded by the pass, not by B·P; :meth:`result` gives log q, B×K×h×w. ``gated`` and
    ``mean`` keep running sums; ``authors`` keeps the binary masks B×P×h×w and IoUs B×P.
    """

    def __init__(self, rule: str, batch: int, prompts_per_image: int):
        self.rule, self.batch, self.prompts_per_image = rule, batch, prompts_per_image
        self.state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def add(self, images: slice, prompts: slice, logits: torch.Tensor, iou: Optional[torch.Tensor]) -> None:
        """logits (n·p)×K×h×w and IoUs n×p×(K-1) (or None) of ``prompts`` of each of the n ``images``."""
        count = len(range(*prompts.indices(self.prompts_per_image)))
        if self.rule == "authors":
            check_grid_aggregation(self.rule, logits.shape[1])
            masks = (logits[:, 1] > logits[:, 0]).unflatten(0, (-1, count))
            scores = masks.new_ones(masks.shape[:2], dtype=torch.float32) if iou is None else iou[..., 0].float()
            if self.state is None:
                self.state = (masks.new_zeros(self.batch, self.prompts_per_image, *masks.shape[2:]),
                              scores.new_zeros(self.batch, self.prompts_per_image))
            self.state[0][images, prompts], self.state[1][images, prompts] = masks, scores
            return
        sums = gated_sums if self.rule == "gated" else weighted_probability_sums
        parts = sums(logits, iou, count)
        if self.state is None:
            self.state = tuple(part.new_zeros(self.batch, *part.shape[1:]) for part in parts)
        for total, part in zip(self.state, parts):
            total[images] += part

    def result(self) -> torch.Tensor:
        if self.rule == "authors":
            masks, scores = self.state
            return mask_log_probabilities(torch.stack([authors_mask(m, s) for m, s in zip(masks, scores)]))
        if self.rule == "gated":
            return gated_log_probabilities(*self.state)
        return weighted_mean_log_probabilities(*self.state)


def aggregate(logits: torch.Tensor, iou: Optional[torch.Tensor], prompts_per_image: int, rule: str) -> torch.Tensor:
    """All prompts at once: (B·P)×K×h×w logits, IoUs B×P×(K-1) or None → log q, B×K×h×w."""
    aggregator = GridAggregator(rule, logits.shape[0] // prompts_per_image, prompts_per_image)
    aggregator.add(slice(None), slice(None), logits, iou)
    return aggregator.result()
