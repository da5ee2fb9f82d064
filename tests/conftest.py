"""Shared fixtures: tiny official-layout SAM checkpoints and the real test data folder."""

from pathlib import Path

import pytest

from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_sam_checkpoint

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """A random 8-block ViT (embed 32, window 4, global blocks 1/3/5/7, 128×128 input) in SAM's key layout."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    write_random_sam_checkpoint(str(path), seed=0)
    return path


@pytest.fixture(scope="session")
def other_tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """Same architecture as ``tiny_sam_checkpoint``, other weights."""
    path = tmp_path_factory.mktemp("sam_other") / "sam_tiny_other.pth"
    write_random_sam_checkpoint(str(path), seed=1)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it sits beside the checkout in development and CI)")
    return SHARED_DATA
