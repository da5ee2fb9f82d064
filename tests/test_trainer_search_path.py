"""nnU-Net finds the DeSAM trainers with no setup step: pip installs nnunetv2_desam.pth, which adds the
trainers folder to nnUNet_extTrainer in every interpreter (the console-command tests run without it set)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_desam.trainer_search_path import TRAINERS_FOLDER
from nnunetv2_desam.trainer_search_path import main as trainer_path_entry_point


def ext_trainer_in_a_fresh_interpreter(value):
    environment = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    if value is not None:
        environment["nnUNet_extTrainer"] = value
    command = [sys.executable, "-c", "import os; print(os.environ['nnUNet_extTrainer'])"]
    return subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("value, expected", [
    (None, TRAINERS_FOLDER),
    (f"/my/trainers{os.pathsep}/more", f"/my/trainers{os.pathsep}/more{os.pathsep}{TRAINERS_FOLDER}"),
    (f"{TRAINERS_FOLDER}{os.pathsep}/my/trainers", f"{TRAINERS_FOLDER}{os.pathsep}/my/trainers"),
])
def test_every_interpreter_of_the_environment_registers_the_trainers_once(value, expected):
    assert ext_trainer_in_a_fresh_interpreter(value) == expected


def test_the_trainer_path_command_prints_the_folder_nnunet_searches(capsys):
    trainer_path_entry_point([])
    folder = Path(capsys.readouterr().out.strip())
    assert folder == Path(TRAINERS_FOLDER) and (folder / "nnUNetTrainerDeSAM.py").is_file()
