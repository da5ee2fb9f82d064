"""Registers the DeSAM trainers with nnU-Net at interpreter start, so no setup step is needed.

``pip install`` puts ``nnunetv2_desam.pth`` beside the package; Python runs its one line in every
interpreter of that environment, which imports this module. It adds :data:`TRAINERS_FOLDER` to
``nnUNet_extTrainer`` (nnU-Net >= 2.8 reads the variable when it looks a trainer up, and the
subprocesses it starts inherit it). Standard library only, and it never raises: it runs before
every Python program of the environment.
"""
import os

TRAINERS_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers")
VARIABLE = "nnUNet_extTrainer"


def with_trainers_folder(value: str) -> str:
    """``value`` (an os.pathsep-separated folder list, possibly empty) with our trainers folder appended once."""
    folders = [folder for folder in value.split(os.pathsep) if folder]
    if TRAINERS_FOLDER not in folders:
        folders.append(TRAINERS_FOLDER)
    return os.pathsep.join(folders)


def register(environment=os.environ) -> None:
    environment[VARIABLE] = with_trainers_folder(environment.get(VARIABLE, ""))


register()
