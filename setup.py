"""nnunetv2-desam. Besides the package, every install (wheel or editable) puts ``nnunetv2_desam.pth`` into
site-packages: it puts the trainers on nnU-Net's search path at interpreter start (nnunetv2_desam/trainer_search_path.py)."""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_FILE = "nnunetv2_desam.pth"


class BuildPyWithPth(build_py):
    """Regular wheels: the .pth file goes to the root of build_lib, i.e. of site-packages."""

    def run(self):
        super().run()
        self.copy_file(PTH_FILE, str(Path(self.build_lib) / PTH_FILE), preserve_mode=False)


class EditableWheelWithPth(editable_wheel):
    """Editable installs (pip install -e): setuptools writes its own wheel; add the .pth file to it."""

    def _create_wheel_file(self, bdist_wheel):
        from wheel.wheelfile import WheelFile

        wheel_path = super()._create_wheel_file(bdist_wheel)
        with WheelFile(wheel_path, "a") as wheel:
            wheel.write(PTH_FILE, PTH_FILE)
        return wheel_path


setup(
    name="nnunetv2-desam",
    version="0.1.0",
    description="DeSAM (Decoupled Segment Anything Model, MICCAI 2024) as nnU-Net v2 trainers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_desam", "nnunetv2_desam.*"]),
    install_requires=[
        "nnunetv2>=2.8",
        "torch>=2.1.2",
        "segment-anything>=1.0",
        "torchvision",  # batched NMS of the authors' grid sequence
        "opencv-python-headless",  # segment_anything's remove_small_regions (authors' grid sequence)
        "batchgenerators>=0.25.1",
        "SimpleITK>=2.2.1",
        "acvl-utils>=0.2.6",
        "matplotlib",
        "scipy>=1.15",  # scipy.stats.bootstrap(rng=...)
    ],
    extras_require={"test": ["pytest>=7"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    entry_points={
        "console_scripts": [
            "nnUNetv2_desam_trainer_path = nnunetv2_desam.trainer_search_path:main",
            "nnUNetv2_desam_convert_prostate = nnunetv2_desam.experiments.convert_prostate:main",
            "nnUNetv2_desam_convert_abdominal = nnunetv2_desam.experiments.convert_abdominal:main",
            "nnUNetv2_desam_crossdomain = nnunetv2_desam.experiments.crossdomain.cli:main",
            "nnUNetv2_desam_demo = nnunetv2_desam.experiments.demo:main",
        ]
    },
)
