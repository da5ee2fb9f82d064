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


HOOK_PROBE = """
import sys
from nnunetv2_desam.errors import ConfigurationError
print(getattr(sys.excepthook, '__wrapped_desam__', False))
raise ConfigurationError('probe message')
"""


@pytest.mark.parametrize("script_name, one_line", [("nnUNetv2_train", True), ("my_service.py", False)])
def test_one_line_errors_only_under_nnunet_commands(tmp_path, script_name, one_line):
    """Under an nnU-Net console script an uncaught DeSAMError prints one line; any other program keeps Python's hook
    (and its traceback): library code never touches sys.excepthook."""
    script = tmp_path / script_name
    script.write_text(HOOK_PROBE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout.strip() == str(one_line)
    if one_line:
        assert result.stderr.strip() == "nnunetv2-desam: error: probe message"
    else:
        assert "Traceback" in result.stderr and "ConfigurationError: probe message" in result.stderr


def test_building_a_trainer_and_its_network_leaves_the_exception_hook_alone(workspace):
    from unittest import mock

    import torch

    from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM
    from tests.nnunet_workspace import nnunet_folders, trainer_arguments

    root, env = workspace
    plans, dataset_json = trainer_arguments(root)
    hook = sys.excepthook
    with mock.patch.dict(os.environ, {**nnunet_folders(root), "DESAM_SAM_CHECKPOINT": env["DESAM_SAM_CHECKPOINT"]}):
        trainer = nnUNetTrainerDeSAM(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
    assert sys.excepthook is hook
