"""Parsing of the DESAM_* variables that are not integers, and what the budget variables do to a trainer."""

import os
from unittest import mock

import pytest
import torch

from nnunetv2_desam.environment_variables import LEARNING_RATE_VARIABLE, learning_rate_from_environment
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget
from tests.nnunet_workspace import nnunet_folders, trainer_arguments


def test_learning_rate_defaults_to_the_given_one_and_reads_positive_numbers():
    assert learning_rate_from_environment(1e-4, {}) == 1e-4
    assert learning_rate_from_environment(1e-4, {LEARNING_RATE_VARIABLE: ""}) == 1e-4
    assert learning_rate_from_environment(1e-4, {LEARNING_RATE_VARIABLE: " 3e-3 "}) == 3e-3


@pytest.mark.parametrize("value", ["0", "-1e-3", "fast", "nan", "inf"])
def test_learning_rate_refuses_anything_but_a_positive_number(value):
    with pytest.raises(ConfigurationError, match=f"{LEARNING_RATE_VARIABLE} must be a positive number"):
        learning_rate_from_environment(1e-4, {LEARNING_RATE_VARIABLE: value})


def trainer_with_epochs(trainer_class, root, epochs):
    """``trainer_class`` as nnUNetv2_train builds it from the workspace, with DESAM_EPOCHS set to ``epochs`` (None: unset)."""
    plans, dataset_json = trainer_arguments(root)
    with mock.patch.dict(os.environ, nnunet_folders(root)):
        os.environ.pop("DESAM_EPOCHS", None)
        if epochs is not None:
            os.environ["DESAM_EPOCHS"] = epochs
        return trainer_class(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


@pytest.mark.parametrize("epochs, save_every", [(None, 50), ("1000", 50), ("40", 2), ("6", 1)])
def test_a_shortened_budget_saves_checkpoint_latest_as_often_per_run_as_nnunet(workspace, epochs, save_every):
    """nnU-Net saves checkpoint_latest.pth every 50 of 1000 epochs; a 40-epoch run would never save one and ``--c``
    would fall back to the best epoch."""
    trainer = trainer_with_epochs(nnUNetTrainerBudget, workspace[0], epochs)
    assert trainer.save_every == save_every


@pytest.mark.parametrize("epochs, save_every", [(None, 50), ("50", 50), ("40", 2)])
def test_desams_own_budget_keeps_nnunets_save_interval_until_a_variable_shortens_it(workspace, epochs, save_every):
    """DeSAM's default of 50 epochs is its budget, not a shortened run: no variable, no extra checkpoint_latest.pth writes."""
    from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM

    trainer = trainer_with_epochs(nnUNetTrainerDeSAM, workspace[0], epochs)
    assert trainer.num_epochs == int(epochs or 50) and trainer.save_every == save_every
