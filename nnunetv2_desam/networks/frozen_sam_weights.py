"""Slim checkpoints for networks that keep part of a SAM file frozen: frozen weights out, a fingerprint in.

The frozen part is in the SAM file, which prediction reads anyway, so a checkpoint holds only what
trained plus a SHA-256 fingerprint of the SAM weights. Loading checks the fingerprint against the
SAM file in use (weights trained on top of other SAM weights are refused) and fills the frozen
entries from the network itself, so nnU-Net's strict ``load_state_dict`` and
``-pretrained_weights`` work on slim checkpoints. Used by DeSAM and SAMed.
"""

import os
from functools import partial
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.networks.sam_checkpoint import sam_fingerprint

FINGERPRINT_KEY = "sam_fingerprint"


def untrained_state_keys(network: nn.Module) -> List[str]:
    """State-dict keys of every tensor that does not train: frozen parameters and persistent buffers.

    For networks built on a SAM file (DeSAM, SAMed) these are exactly the SAM-derived weights.
    """
    trainable = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    return [key for key in network.state_dict(keep_vars=True) if key not in trainable and key != FINGERPRINT_KEY]


def keep_frozen_sam_weights_out_of_checkpoints(
    network: nn.Module, sam_state_dict: Dict[str, torch.Tensor], frozen_keys: Iterable[str], model_name: str,
    fingerprint: Optional[str] = None,
) -> None:
    """Record the SAM fingerprint in ``network`` and leave ``frozen_keys`` out of its state dict.

    Call after the network is built and frozen. ``model_name`` names the model in the refusal;
    ``fingerprint`` (hex) is the SAM weights' when already known (read from a file through the
    fingerprint cache), else they are hashed.
    """
    digest = bytes.fromhex(fingerprint or sam_fingerprint(sam_state_dict))
    network.register_buffer(FINGERPRINT_KEY, torch.tensor(list(digest), dtype=torch.uint8))
    frozen = tuple(frozen_keys)
    network.register_state_dict_post_hook(partial(_drop_frozen_weights, frozen))
    network.register_load_state_dict_pre_hook(partial(_check_fingerprint_and_complete, frozen, model_name))


def recorded_fingerprint(network: nn.Module) -> str:
    """The hex fingerprint of the SAM weights ``network`` was built from."""
    return bytes(getattr(network, FINGERPRINT_KEY).cpu().tolist()).hex()


def _drop_frozen_weights(frozen, module, state_dict, prefix, local_metadata) -> None:
    for key in frozen:
        state_dict.pop(prefix + key, None)


def _check_fingerprint_and_complete(frozen, model_name, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    key = prefix + FINGERPRINT_KEY
    if key in state_dict:
        saved, current = bytes(state_dict[key].cpu().tolist()).hex(), recorded_fingerprint(module)
        if saved != current:
            raise SAMCheckpointError(
                f"these {model_name} weights were trained with SAM weights of fingerprint {saved[:16]}…, but the SAM "
                f"checkpoint in use ({_sam_file_in_use()}) has fingerprint {current[:16]}…: point DESAM_SAM_CHECKPOINT at "
                f"the SAM file used for training"
            )
    for name in frozen:
        state_dict.setdefault(prefix + name, _tensor(module, name).detach())


def _sam_file_in_use() -> str:
    return os.environ.get("DESAM_SAM_CHECKPOINT") or "the packaged LiteMedSAM, DESAM_SAM_CHECKPOINT being unset"


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)
