from setuptools import find_packages, setup

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
        "batchgenerators>=0.25.1",
        "SimpleITK>=2.2.1",
        "acvl-utils>=0.2.6",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "console_scripts": [
            "nnUNetv2_desam_trainer_path = nnunetv2_desam.registration:trainer_path_entry_point",
            "nnUNetv2_desam_convert_prostate = nnunetv2_desam.experiments.convert_prostate:main",
            "nnUNetv2_desam_convert_abdominal = nnunetv2_desam.experiments.convert_abdominal:main",
            "nnUNetv2_desam_crossdomain = nnunetv2_desam.experiments.crossdomain:main",
            "nnUNetv2_desam_demo = nnunetv2_desam.experiments.demo:main",
        ]
    },
)
