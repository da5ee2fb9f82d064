"""Environment variables, their clear errors, and the trainer folder for nnU-Net's ``nnUNet_extTrainer``."""

import argparse
import os

from nnunetv2_desam.networks.sam_checkpoint import OFFICIAL_CHECKPOINT_URLS
from nnunetv2_desam.nnunet_registration import TRAINERS_FOLDER, register

SAM_CHECKPOINT_VARIABLE = "DESAM_SAM_CHECKPOINT"
GRID_SIZE_VARIABLE = "DESAM_GRID_SIZE"


class DeSAMUsageError(SystemExit):
    """Exit with one line on stderr, no traceback: for mistakes a user can fix."""

    def __init__(self, message: str):
        super().__init__(f"nnunetv2-desam: {message}")


def sam_checkpoint_path() -> str:
    """The SAM file named by ``DESAM_SAM_CHECKPOINT``; a clear exit when it is unset."""
    path = os.environ.get(SAM_CHECKPOINT_VARIABLE)
    if not path:
        urls = ", ".join(OFFICIAL_CHECKPOINT_URLS.values())
        raise DeSAMUsageError(
            f"{SAM_CHECKPOINT_VARIABLE} is not set. Point it at an official SAM checkpoint file "
            f"(download one of {urls}), e.g. export {SAM_CHECKPOINT_VARIABLE}=/path/to/sam_vit_h_4b8939.pth"
        )
    return path


def positive_int_from_environment(variable: str):
    """The value of ``variable`` as a positive integer, None when unset; a clear exit otherwise."""
    value = os.environ.get(variable, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise DeSAMUsageError(f"{variable} must be a positive integer, got {value!r}")
    return int(value)


def grid_size_from_environment(default: int) -> int:
    """Points per side of the inference grid, overridable with ``DESAM_GRID_SIZE``."""
    value = positive_int_from_environment(GRID_SIZE_VARIABLE)
    return default if value is None else value


def environment_with_trainers(environment=None) -> dict:
    """A copy of the environment with our trainers folder added to ``nnUNet_extTrainer``."""
    environment = dict(os.environ if environment is None else environment)
    register(environment)
    return environment


def trainer_path_entry_point(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the folder holding the DeSAM trainers, for nnU-Net's nnUNet_extTrainer variable. "
        "pip install already adds it to nnUNet_extTrainer in every Python of the environment (nnunetv2_desam.pth); "
        'set it yourself only where .pth files do not run (python -S): export nnUNet_extTrainer="$(nnUNetv2_desam_trainer_path)"',
    )
    parser.add_argument("--export", action="store_true", help="print a shell export line that keeps folders already listed")
    args = parser.parse_args(argv)
    if args.export:
        print(f"export nnUNet_extTrainer={environment_with_trainers()['nnUNet_extTrainer']!s}")
    else:
        print(TRAINERS_FOLDER)
