"""A small synthetic multi-domain dataset: the same anatomy seen through different "scanners".

Each case holds two ellipsoidal "organs" (labels 1 and 2) in a noisy body. Domains differ the way
sites and modalities do: a nonlinear intensity mapping (contrast may even invert), a smooth
multiplicative bias field, noise level and overall scale. Used by the demo and the tests.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

LABELS = {"background": 0, "organ_a": 1, "organ_b": 2}


@dataclass(frozen=True)
class SyntheticDomain:
    """How one site renders tissue: intensity = scale · bias · gamma-mapped tissue value + noise."""

    name: str
    tissue_values: Sequence[float]  # background, body, organ_a, organ_b in [0, 1]
    gamma: float
    bias_strength: float
    noise: float
    scale: float


DEFAULT_DOMAINS = (
    SyntheticDomain("SiteA", (0.0, 0.35, 0.75, 0.55), gamma=1.0, bias_strength=0.05, noise=0.03, scale=1000.0),
    SyntheticDomain("SiteB", (0.0, 0.45, 0.65, 0.85), gamma=0.6, bias_strength=0.3, noise=0.06, scale=300.0),
    SyntheticDomain("SiteC", (0.05, 0.7, 0.3, 0.45), gamma=1.6, bias_strength=0.2, noise=0.1, scale=1.0),
)


def synthetic_case(domain: SyntheticDomain, rng: np.random.Generator, shape=(6, 64, 64)):
    """One volume (Z×Y×X float32) and its label map (uint8)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    labels = np.zeros(shape, np.uint8)
    body = (y / 0.9) ** 2 + (x / 0.8) ** 2 < 1
    tissue = np.where(body, domain.tissue_values[1], domain.tissue_values[0])
    for label, value in ((1, domain.tissue_values[2]), (2, domain.tissue_values[3])):
        centre = rng.uniform(-0.4, 0.4, size=2)
        radii = rng.uniform(0.15, 0.3, size=3)
        organ = ((z / (radii[0] * 4)) ** 2 + ((y - centre[0]) / radii[1]) ** 2 + ((x - centre[1]) / radii[2]) ** 2) < 1
        organ &= body & (labels == 0)
        labels[organ] = label
        tissue = np.where(organ, value, tissue)
    bias = 1 + domain.bias_strength * np.sin(np.pi * (x * rng.uniform(0.5, 1.5) + y * rng.uniform(0.5, 1.5)))
    image = domain.scale * (bias * np.clip(tissue, 0, 1) ** domain.gamma + rng.normal(0, domain.noise, shape))
    return image.astype(np.float32), labels


def write_synthetic_dataset(raw_folder: Path, dataset_id: int, domain: SyntheticDomain, num_cases: int, seed: int, shape=(6, 64, 64)) -> Path:
    """Write ``Dataset{id}_{domain.name}`` as an nnU-Net raw dataset; returns its folder."""
    folder = Path(raw_folder) / f"Dataset{dataset_id:03d}_{domain.name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_cases):
        image, labels = synthetic_case(domain, rng, shape)
        case = f"{domain.name}_{index:03d}"
        for array, path in ((image, folder / "imagesTr" / f"{case}_0000.nii.gz"), (labels, folder / "labelsTr" / f"{case}.nii.gz")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((1.0, 1.0, 3.0))
            sitk.WriteImage(volume, str(path))
    generate_dataset_json(str(folder), {0: "MRI"}, LABELS, num_cases, ".nii.gz", dataset_name=folder.name)
    return folder


def write_synthetic_domains(raw_folder: Path, first_id: int, num_cases: int, seed: int = 0, domains=DEFAULT_DOMAINS, shape=(6, 64, 64)) -> List[Path]:
    """One dataset per domain, consecutive ids from ``first_id``."""
    return [
        write_synthetic_dataset(raw_folder, first_id + i, domain, num_cases, seed + i, shape)
        for i, domain in enumerate(domains)
    ]
