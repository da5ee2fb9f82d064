"""Pieces of nnU-Net's ``train_step`` for trainers that must write their own step.

nnU-Net runs the forward pass under autocast only on CUDA (slow on CPU, refused on MPS) and updates with
a (scaled) backward pass, gradient-norm clipping at 12 and an optimizer step; these reproduce that.
"""

from typing import Iterable, Optional

import torch
from torch import autocast
from nnunetv2.utilities.helpers import dummy_context

GRADIENT_CLIP_NORM = 12


def autocast_on_cuda(device: torch.device):
    """nnU-Net's mixed-precision context: autocast on CUDA, nothing elsewhere."""
    return autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context()


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_scaler: Optional[torch.GradScaler],
                      parameters: Iterable[torch.nn.Parameter]) -> None:
    """nnU-Net's update of ``parameters``: (scaled) backward, clip the gradient norm at 12, step."""
    parameters = list(parameters)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, GRADIENT_CLIP_NORM)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, GRADIENT_CLIP_NORM)
        optimizer.step()
