"""A small synthetic multi-domain dataset: the same anatomy seen through different "scanners".

Each case holds ellipsoidal "organs" (by default two, labels 1 and 2; :data:`FOUR_ORGANS` gives a
large, two mid-sized and a small one, like the abdominal task) in a noisy body. Domains differ the
way sites and modalities do: a nonlinear intensity mapping (contrast may even invert), a smooth
multiplicative bias field, noise level and overall scale. Used by the demo and the tests.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

ORGAN_NAMES = ("organ_a", "organ_b", "organ_c", "organ_d")


@dataclass(frozen=True)
class OrganShape:
    """Where an ellipsoidal organ lies (in [-1, 1]² of the slice) and how large it is."""

    centre: Tuple[float, float] = (0.0, 0.0)  # (y, x), jittered by ±``jitter``
    jitter: float = 0.4
    radii: Tuple[float, float] = (0.15, 0.3)  # each of the three semi-axes drawn from this range


TWO_ORGANS = (OrganShape(), OrganShape())
FOUR_ORGANS = (  # one large, two mid-sized, one small; in separate regions, so none covers another
    OrganShape(centre=(-0.3, -0.3), jitter=0.05, radii=(0.3, 0.4)),
    OrganShape(centre=(0.35, -0.35), jitter=0.05, radii=(0.15, 0.2)),
    OrganShape(centre=(0.35, 0.35), jitter=0.05, radii=(0.15, 0.2)),
    OrganShape(centre=(-0.35, 0.35), jitter=0.05, radii=(0.1, 0.12)),
)


def label_names(num_organs: int) -> Dict[str, int]:
    """dataset.json's labels for ``num_organs`` organs: background 0, organ_a 1, …"""
    return {"background": 0, **{name: label for label, name in enumerate(ORGAN_NAMES[:num_organs], start=1)}}


LABELS = label_names(2)


@dataclass(frozen=True)
class SyntheticDomain:
    """How one site renders tissue: intensity = scale · bias · gamma-mapped tissue value + noise."""

    name: str
    tissue_values: Sequence[float]  # background, body, then one per organ, in [0, 1]
    gamma: float
    bias_strength: float
    noise: float
    scale: float


DEFAULT_DOMAINS = (
    SyntheticDomain("SiteA", (0.0, 0.35, 0.75, 0.55), gamma=1.0, bias_strength=0.05, noise=0.03, scale=1000.0),
    SyntheticDomain("SiteB", (0.0, 0.45, 0.65, 0.85), gamma=0.6, bias_strength=0.3, noise=0.06, scale=300.0),
    SyntheticDomain("SiteC", (0.05, 0.7, 0.3, 0.45), gamma=1.6, bias_strength=0.2, noise=0.1, scale=1.0),
)
FOUR_ORGAN_DOMAIN = SyntheticDomain("FourOrgans", (0.0, 0.35, 0.75, 0.55, 0.95, 0.15), gamma=1.0, bias_strength=0.05, noise=0.03, scale=1000.0)


def synthetic_case(domain: SyntheticDomain, rng: np.random.Generator, shape=(6, 64, 64), organs: Sequence[OrganShape] = TWO_ORGANS):
    """One volume (Z×Y×X float32) and its label map (uint8), organ k+1 shaped by ``organs[k]``."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    labels = np.zeros(shape, np.uint8)
    body = (y / 0.9) ** 2 + (x / 0.8) ** 2 < 1
    tissue = np.where(body, domain.tissue_values[1], domain.tissue_values[0])
    for label, organ_shape in enumerate(organs, start=1):
        value = domain.tissue_values[1 + label]
        centre = np.asarray(organ_shape.centre) + rng.uniform(-organ_shape.jitter, organ_shape.jitter, size=2)
        radii = rng.uniform(*organ_shape.radii, size=3)
        organ = ((z / (radii[0] * 4)) ** 2 + ((y - centre[0]) / radii[1]) ** 2 + ((x - centre[1]) / radii[2]) ** 2) < 1
        organ &= body & (labels == 0)
        labels[organ] = label
        tissue = np.where(organ, value, tissue)
    bias = 1 + domain.bias_strength * np.sin(np.pi * (x * rng.uniform(0.5, 1.5) + y * rng.uniform(0.5, 1.5)))
    image = domain.scale * (bias * np.clip(tissue, 0, 1) ** domain.gamma + rng.normal(0, domain.noise, shape))
    return image.astype(np.float32), labels


def write_synthetic_dataset(raw_folder: Path, dataset_id: int, domain: SyntheticDomain, num_cases: int, seed: int, shape=(6, 64, 64),
                            organs: Sequence[OrganShape] = TWO_ORGANS) -> Path:
    """Write ``Dataset{id}_{domain.name}`` as an nnU-Net raw dataset; returns its folder."""
    folder = Path(raw_folder) / f"Dataset{dataset_id:03d}_{domain.name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_cases):
        image, labels = synthetic_case(domain, rng, shape, organs)
        case = f"{domain.name}_{index:03d}"
        for array, path in ((image, folder / "imagesTr" / f"{case}_0000.nii.gz"), (labels, folder / "labelsTr" / f"{case}.nii.gz")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((1.0, 1.0, 3.0))
            sitk.WriteImage(volume, str(path))
    generate_dataset_json(str(folder), {0: "MRI"}, label_names(len(organs)), num_cases, ".nii.gz", dataset_name=folder.name)
    return folder


def write_synthetic_domains(raw_folder: Path, first_id: int, num_cases: int, seed: int = 0, domains=DEFAULT_DOMAINS, shape=(6, 64, 64)) -> List[Path]:
    """One dataset per domain, consecutive ids from ``first_id``."""
    return [
        write_synthetic_dataset(raw_folder, first_id + i, domain, num_cases, seed + i, shape)
        for i, domain in enumerate(domains)
    ]
