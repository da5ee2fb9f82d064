"""``checkpoint_final.pth`` without what only resuming needs, written once and atomically.

The DeSAM and SAM fine-tuning trainers drop the optimizer's moments from the final checkpoint (Adam
keeps two tensors per trained weight). nnU-Net builds its checkpoint inside ``save_checkpoint``; it
is built here into memory, slimmed, and written to a temporary file beside the target that is then
renamed over it: an interruption leaves the previous file (or none), never a truncated one.
"""

import io
import os
from typing import BinaryIO, Callable

import torch

FINAL_CHECKPOINT = "checkpoint_final.pth"


def is_final_checkpoint(filename: str) -> bool:
    return os.path.basename(filename) == FINAL_CHECKPOINT


def drop_optimizer_moments(checkpoint: dict) -> None:
    """Empty the optimizer's per-parameter state; its parameter groups stay, so ``--c`` still loads the file."""
    checkpoint["optimizer_state"]["state"] = {}


def save_slim_checkpoint(save: Callable[[BinaryIO], None], filename: str, slim: Callable[[dict], None]) -> None:
    """``save(buffer)`` (nnU-Net's ``save_checkpoint`` into memory), ``slim(checkpoint)``, one atomic write to ``filename``.

    Writes nothing when ``save`` wrote nothing (checkpointing disabled, or not DDP rank 0).
    """
    buffer = io.BytesIO()
    save(buffer)
    if not buffer.tell():
        return
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=False)
    slim(checkpoint)
    temporary = f"{filename}.partial"
    torch.save(checkpoint, temporary)
    os.replace(temporary, filename)
