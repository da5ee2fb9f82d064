"""nnU-Net finds the DeSAM trainers with no setup step: pip installs nnunetv2_desam.pth, which adds the
trainers folder to nnUNet_extTrainer in every interpreter (the console-command tests run without it set)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nnunetv2_desam.trainer_search_path import TRAINERS_FOLDER
from nnunetv2_desam.trainer_search_path import main as trainer_path_entry_point

PROJECT = Path(__file__).resolve().parents[1]


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


def test_a_built_wheel_installs_the_pth_file_into_site_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(PROJECT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("nnunetv2_desam-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("nnunetv2_desam.pth").decode() == (PROJECT / "nnunetv2_desam.pth").read_text()
        record = next(name for name in archive.namelist() if name.endswith(".dist-info/RECORD"))
        assert "nnunetv2_desam.pth," in archive.read(record).decode()
        assert "nnunetv2_desam/trainer_search_path.py" in archive.namelist()
