"""Puts the DeSAM trainers on nnU-Net's trainer search path at interpreter start, so no setup step is needed.

``pip install`` puts ``nnunetv2_desam.pth`` beside the package; Python runs its one (guarded) line
in every interpreter of that environment, which imports this module. It appends
:data:`TRAINERS_FOLDER` to ``nnUNet_extTrainer`` (nnU-Net >= 2.8 reads the variable when it looks
a trainer up, and the subprocesses it starts inherit it). Standard library only, and it never
raises: it runs before every Python program of the environment.

Under nnU-Net's own console commands (``nnUNetv2_train``, ``nnUNetv2_predict``, …), which build our
trainers and networks but do not catch our exceptions, it also makes an uncaught
:class:`~nnunetv2_desam.errors.DeSAMError` print one line instead of a traceback. Nowhere else:
library use (a service embedding ``nnUNetPredictor``, a notebook) keeps its own exception hook.
"""
import argparse
import os
import shlex
import sys

TRAINERS_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers")
VARIABLE = "nnUNet_extTrainer"


def with_trainers_folder(value: str) -> str:
    """``value`` (an os.pathsep-separated folder list, possibly empty) with our trainers folder appended once."""
    folders = [folder for folder in value.split(os.pathsep) if folder]
    if TRAINERS_FOLDER not in folders:
        folders.append(TRAINERS_FOLDER)
    return os.pathsep.join(folders)


def add_trainers_folder(environment=os.environ) -> None:
    environment[VARIABLE] = with_trainers_folder(environment.get(VARIABLE, ""))


def environment_with_trainers(environment=None) -> dict:
    """A copy of ``environment`` (default: this process's) with our trainers folder in ``nnUNet_extTrainer``."""
    environment = dict(os.environ if environment is None else environment)
    add_trainers_folder(environment)
    return environment


def main(argv=None) -> None:
    """``nnUNetv2_desam_trainer_path``: print the folder, or with ``--export`` a shell line that keeps listed folders."""
    parser = argparse.ArgumentParser(
        description="Print the folder holding the DeSAM trainers, for nnU-Net's nnUNet_extTrainer variable. "
        "pip install already adds it to nnUNet_extTrainer in every Python of the environment (nnunetv2_desam.pth); "
        "set it yourself only where .pth files do not run (python -S): "
        'eval "$(nnUNetv2_desam_trainer_path --export)" keeps the folders already listed, '
        'export nnUNet_extTrainer="$(nnUNetv2_desam_trainer_path)" replaces them',
    )
    parser.add_argument("--export", action="store_true", help="print a shell export line that keeps folders already listed")
    args = parser.parse_args(argv)
    if args.export:
        print(f"export {VARIABLE}={shlex.quote(environment_with_trainers()[VARIABLE])}")
    else:
        print(TRAINERS_FOLDER)


def is_nnunet_command(argv) -> bool:
    """Whether this interpreter runs one of nnU-Net's console scripts (``nnUNetv2_*``)."""
    return bool(argv) and os.path.basename(argv[0]).startswith("nnUNetv2_")


def report_errors_in_one_line_under_nnunet_commands(argv=sys.argv) -> None:
    if is_nnunet_command(argv):
        from nnunetv2_desam.console import report_desam_errors_in_one_line

        report_desam_errors_in_one_line()


add_trainers_folder()
report_errors_in_one_line_under_nnunet_commands()
