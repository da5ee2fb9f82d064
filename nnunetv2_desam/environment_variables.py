"""The ``DESAM_*`` environment variables: names, parsing, and the errors a user sees for bad values.

nnU-Net builds networks in a static method and trainers from its own command line, so settings
that must reach them (the SAM file, the inference grid, a shortened budget, the learning rate)
travel as environment variables; every integer reader goes through :func:`positive_int`.
"""

import argparse
import math
import os
from typing import Mapping, Optional

from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.networks.grid_aggregation import GRID_AGGREGATIONS
from nnunetv2_desam.networks.default_sam_checkpoint import packaged_litemedsam

SAM_CHECKPOINT_VARIABLE = "DESAM_SAM_CHECKPOINT"
GRID_SIZE_VARIABLE = "DESAM_GRID_SIZE"
GRID_AGGREGATION_VARIABLE = "DESAM_GRID_AGGREGATION"
BATCH_SIZE_VARIABLE = "DESAM_BATCH_SIZE"
LEARNING_RATE_VARIABLE = "DESAM_LEARNING_RATE"
BUDGET_VARIABLES = {  # trainer attribute -> variable
    "num_epochs": "DESAM_EPOCHS",
    "num_iterations_per_epoch": "DESAM_ITERATIONS_PER_EPOCH",
    "num_val_iterations_per_epoch": "DESAM_VAL_ITERATIONS_PER_EPOCH",
}


def positive_int(text: str, name: str) -> int:
    """``text`` as a positive integer; :class:`ConfigurationError` naming ``name`` otherwise."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def positive_int_argument(text: str) -> int:
    """:func:`positive_int` as an argparse ``type``: a bad value becomes argparse's usage message."""
    try:
        return positive_int(text, "the value")
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int_from_environment(variable: str, environment: Mapping[str, str] = os.environ) -> Optional[int]:
    """The value of ``variable`` as a positive integer, None when unset or empty."""
    value = environment.get(variable, "")
    return positive_int(value, variable) if value else None


def sam_checkpoint_path(environment: Mapping[str, str] = os.environ) -> str:
    """The SAM file named by ``DESAM_SAM_CHECKPOINT``, else the packaged LiteMedSAM
    (:func:`~nnunetv2_desam.networks.default_sam_checkpoint.packaged_litemedsam`); :class:`ConfigurationError`
    when it names a directory."""
    path = environment.get(SAM_CHECKPOINT_VARIABLE)
    if not path:
        return packaged_litemedsam()
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith(".pth"))
        raise ConfigurationError(
            f"{SAM_CHECKPOINT_VARIABLE}={path} is a directory; it must name the checkpoint file itself"
            + (f", e.g. {os.path.join(path, inside[0])}" if inside else " (this directory holds no .pth file)")
        )
    return path


def grid_size_from_environment(default: int, environment: Mapping[str, str] = os.environ) -> int:
    """Points per side of the inference grid, overridable with ``DESAM_GRID_SIZE``."""
    value = positive_int_from_environment(GRID_SIZE_VARIABLE, environment)
    return default if value is None else value


def learning_rate_from_environment(default: float, environment: Mapping[str, str] = os.environ) -> float:
    """The DeSAM trainers' initial learning rate: ``DESAM_LEARNING_RATE`` (a positive number) or ``default``."""
    value = environment.get(LEARNING_RATE_VARIABLE, "").strip()
    if not value:
        return default
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigurationError(f"{LEARNING_RATE_VARIABLE} must be a positive number, got {value!r}")
    return rate


def grid_aggregation_from_environment(default: str, environment: Mapping[str, str] = os.environ) -> str:
    """How grid prompts are combined (``gated``, ``mean`` or ``authors``), overridable with ``DESAM_GRID_AGGREGATION``."""
    value = environment.get(GRID_AGGREGATION_VARIABLE, "").strip()
    if value and value not in GRID_AGGREGATIONS:
        raise ConfigurationError(f"{GRID_AGGREGATION_VARIABLE} must be one of {', '.join(GRID_AGGREGATIONS)}, got {value!r}")
    return value or default


def budget_from_environment(environment: Mapping[str, str] = os.environ) -> dict:
    """``{trainer attribute: value}`` for the ``DESAM_EPOCHS`` / ``_ITERATIONS_PER_EPOCH`` / ``_VAL_ITERATIONS_PER_EPOCH`` that are set."""
    budget = {attribute: positive_int_from_environment(variable, environment) for attribute, variable in BUDGET_VARIABLES.items()}
    return {attribute: value for attribute, value in budget.items() if value is not None}


def apply_training_overrides(trainer) -> None:
    """Set an nnU-Net trainer's budget and batch size from the ``DESAM_*`` variables that are set.

    The batch size is written into the configuration, where nnU-Net reads it when the trainer
    initialises (and records it in ``debug.json``); call this from the trainer's ``__init__``.
    A run shortened below the trainer's own epochs keeps nnU-Net's 20 ``checkpoint_latest.pth`` per run (every 50 of 1000 epochs),
    so that ``--c`` resumes an interrupted one where it stopped rather than at its best epoch.
    """
    default_epochs = trainer.num_epochs
    for attribute, value in budget_from_environment().items():
        setattr(trainer, attribute, value)
    if trainer.num_epochs < default_epochs:
        trainer.save_every = min(trainer.save_every, max(1, trainer.num_epochs // 20))
    batch_size = positive_int_from_environment(BATCH_SIZE_VARIABLE)
    if batch_size is not None:
        trainer.configuration_manager.configuration["batch_size"] = batch_size
