"""Packaging: the wheel built from a copy of the tree installs into a fresh environment, where nnU-Net finds
the trainers through nnunetv2_desam.pth; a removed or broken install stays silent at start-up; every
package the code imports is declared."""

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = Path(__file__).resolve().parents[1]
PTH = PROJECT / "nnunetv2_desam.pth"
IGNORED = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache",
                                 ".whl", "benchmark_results", "desam_demo")


def clean_environment() -> dict:
    """This environment without what would let the source tree or our trainers folder leak into a child."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "nnUNet_extTrainer")}


def python(interpreter, code: str, cwd: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([str(interpreter), *flags, "-c", code], cwd=cwd, env=clean_environment(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, built by pip from a copy of the tree, installed with pip into a fresh virtual environment.

    Its dependencies are not installed again (a full install takes minutes): a ``.pth`` line appends this
    environment's site-packages to the fresh one's path. Python does not run the ``.pth`` files of a folder
    added that way, so this environment's own (editable) install stays invisible there.
    """
    pytest.importorskip("hatchling", reason="hatchling, the build backend, comes with the [test] extra (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(PROJECT, root / "source", ignore=IGNORED)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(root / "source")],
                   check=True, capture_output=True, env=clean_environment())
    (wheel,) = (root / "dist").glob("nnunetv2_desam-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    interpreter = root / "venv" / "bin" / "python"
    site_packages = Path(python(interpreter, "import sysconfig; print(sysconfig.get_paths()['purelib'])", root).stdout.strip())
    (site_packages / "test_environment_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = python(interpreter, "import nnunetv2_desam", root)
    assert before.returncode != 0 and "No module named 'nnunetv2_desam'" in before.stderr
    subprocess.run([*pip, "--python", str(interpreter), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, env=clean_environment())
    return root, interpreter, site_packages


FIND_TRAINER = """
import json, os, nnunetv2_desam
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
trainer = recursive_find_trainer_class_by_name("nnUNetTrainerDeSAM")
# nnU-Net drops the module it imported the class from out of sys.modules; its methods keep their file
print(json.dumps({"package": nnunetv2_desam.__file__, "trainer": trainer.train_step.__code__.co_filename,
                  "nnUNet_extTrainer": os.environ["nnUNet_extTrainer"]}))
"""


def test_nnunet_finds_the_trainer_of_an_installed_wheel_with_nnUNet_extTrainer_unset(installed):
    root, interpreter, site_packages = installed
    found = python(interpreter, FIND_TRAINER, root)
    assert found.returncode == 0, found.stderr
    result = json.loads(found.stdout.strip().splitlines()[-1])
    trainers = site_packages / "nnunetv2_desam" / "trainers"
    assert Path(result["package"]).parent == site_packages / "nnunetv2_desam"
    assert Path(result["trainer"]) == trainers / "nnUNetTrainerDeSAM.py"
    assert result["nnUNet_extTrainer"] == str(trainers)
    assert (site_packages / "nnunetv2_desam.pth").read_text() == PTH.read_text()
    command = subprocess.run([str(root / "venv" / "bin" / "nnUNetv2_desam_trainer_path")], cwd=root, env=clean_environment(),
                             capture_output=True, text=True, check=True)
    assert command.stdout.strip() == str(trainers)


def test_pip_uninstall_removes_the_pth_file_and_start_up_stays_silent(installed):
    root, interpreter, site_packages = installed
    subprocess.run([sys.executable, "-m", "pip", "--python", str(interpreter), "uninstall", "-y", "-q", "nnunetv2-desam"],
                   check=True, capture_output=True, env=clean_environment())
    assert not (site_packages / "nnunetv2_desam.pth").exists() and not (site_packages / "nnunetv2_desam").exists()
    started = python(interpreter, "import os; print(os.environ.get('nnUNet_extTrainer'))", root)
    assert (started.stdout, started.stderr) == ("None\n", "")


@pytest.mark.parametrize("package", [None, "raise ImportError('a broken install')", "this is not Python"],
                         ids=["package-removed", "package-raises", "package-syntax-error"])
def test_a_removed_or_broken_package_never_prints_a_traceback_at_start_up(tmp_path, package):
    """Our .pth file in a site folder whose nnunetv2_desam is missing or broken (python -S, then site.addsitedir:
    only that folder's .pth files run, this environment's install is out of reach)."""
    shutil.copy(PTH, tmp_path / PTH.name)
    if package is not None:
        (tmp_path / "nnunetv2_desam").mkdir()
        (tmp_path / "nnunetv2_desam" / "__init__.py").write_text(package + "\n")
    code = f"import os, site; site.addsitedir({str(tmp_path)!r}); print('started', os.environ.get('nnUNet_extTrainer'))"
    started = python(sys.executable, code, tmp_path, "-S")
    assert (started.returncode, started.stdout, started.stderr) == (0, "started None\n", "")


def imported_top_level_modules(package: Path) -> set:
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {canonicalize_name(Requirement(requirement).name) for requirement in declared}
    third_party = imported_top_level_modules(PROJECT / "nnunetv2_desam") - set(sys.stdlib_module_names) - {"nnunetv2_desam"}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {module: distributions.get(module) for module in third_party
                  if not declared & {canonicalize_name(d) for d in distributions.get(module, [])}}
    assert undeclared == {}


def test_the_readme_gives_the_install_and_test_commands_that_ci_runs():
    ci = (PROJECT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.startswith(("pip install", "python -m pytest"))]
    readme = (PROJECT / "README.md").read_text()
    assert len(commands) == 2 and all(command in readme for command in commands)
