"""Training on several augmented views of one batch with nnU-Net's own ``train_step``.

The trainers stack V views of the B samples view-major into one (V·B) batch; the loss takes nnU-Net's
segmentation loss of the first view against the B targets (every deep-supervision level) and adds
``weight`` × ``consistency`` of the views' full-resolution logits. In validation the batch holds one view
and only the segmentation loss is computed.
"""

from typing import Callable, Sequence

import torch
from torch import nn

from nnunetv2_desam.errors import ConfigurationError


def select_view(output, index: int, batch: int):
    """The ``index``-th block of ``batch`` samples of a view-stacked network output (a list under deep supervision)."""
    rows = slice(index * batch, (index + 1) * batch)
    return [o[rows] for o in output] if isinstance(output, (list, tuple)) else output[rows]


class MultiViewLoss(nn.Module):
    def __init__(self, segmentation: nn.Module, consistency: Callable[[Sequence[torch.Tensor]], torch.Tensor], weight: float):
        super().__init__()
        self.segmentation = segmentation
        self.consistency = consistency
        self.weight = weight

    def forward(self, output, target) -> torch.Tensor:
        """``output``: (V·B)×K×spatial logits, or a list of them under deep supervision; ``target``: B-sample targets likewise."""
        full = output[0] if isinstance(output, (list, tuple)) else output
        batch = (target[0] if isinstance(target, (list, tuple)) else target).shape[0]
        loss = self.segmentation(select_view(output, 0, batch), target)
        views = full.shape[0] // batch
        if views > 1:
            loss = loss + self.weight * self.consistency(full.chunk(views))
        return loss


class MultiViewTraining:
    """Mixin for an nnU-Net trainer (listed before it) whose step trains on augmented views of the batch.

    The class provides ``views(data)`` (B×C×spatial → (V·B)×C×spatial, view-major), ``consistency(logits)`` and
    ``settings.consistency_weight``; nnU-Net's own ``train_step`` (autocast, grad scaler, clipping) runs on the views.
    The consistency losses compare softmax predictions, so region-based (sigmoid) datasets are refused.
    """

    def views(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def consistency(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _build_loss(self):
        if self.label_manager.has_regions:
            raise ConfigurationError(f"{type(self).__name__} compares softmax predictions; region-based datasets are not supported")
        return MultiViewLoss(super()._build_loss(), self.consistency, self.settings.consistency_weight)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        return super().train_step({**batch, "data": self.views(data)})
