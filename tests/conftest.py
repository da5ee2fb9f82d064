"""Shared fixtures: tiny official-layout SAM checkpoints, a small nnU-Net workspace and the real test data folder."""

import os
from pathlib import Path

import pytest

from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_sam_checkpoint
from tests.nnunet_workspace import make_workspace

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def cache_folder_of_the_session(tmp_path_factory):
    """The SAM fingerprint cache ($XDG_CACHE_HOME/nnunetv2_desam) of the tests and the commands they run, not the user's."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


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
def workspace(tmp_path_factory, tiny_sam_checkpoint):
    """(root, environment): see :func:`tests.nnunet_workspace.make_workspace`."""
    root = tmp_path_factory.mktemp("nnunet")
    return root, make_workspace(root, tiny_sam_checkpoint)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it sits beside the checkout in development and CI)")
    return SHARED_DATA
