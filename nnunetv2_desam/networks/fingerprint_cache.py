"""SAM-file fingerprints, remembered per file so that a 2.5 GB ViT-H file is hashed once, not at every network build.

Every DeSAM network records the SHA-256 fingerprint of its SAM weights
(:func:`~nnunetv2_desam.networks.sam_checkpoint.sam_fingerprint`), and nnU-Net builds the network
on every DDP rank, for every ``nnUNetv2_predict`` and ``--c``. The fingerprint of a file is
remembered in ``$XDG_CACHE_HOME/nnunetv2_desam/sam_fingerprints.json`` (default
``~/.cache/nnunetv2_desam/``) under the file's real path, together with its device, inode, size,
modification and status-change times (ns); any difference — the file rewritten, replaced, touched
or moved in — and it is hashed again. The cache is an optimisation only: a missing, unreadable,
corrupt or read-only cache means hashing as before, never an error. Writes go to a temporary file
renamed over the old one, so concurrent ranks never see a half-written file (at worst each
hashes once and one entry wins). Entries of files that are gone or changed are dropped on write.
Delete the folder to clear it.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint

CACHE_FILE_NAME = "sam_fingerprints.json"


def cache_file() -> Optional[Path]:
    """``$XDG_CACHE_HOME/nnunetv2_desam/sam_fingerprints.json`` (``~/.cache`` by default); None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:
            return None
    return Path(base) / "nnunetv2_desam" / CACHE_FILE_NAME


def file_signature(path: str) -> Optional[dict]:
    """What identifies one version of a file: device, inode, size, mtime and ctime in ns (None if unreadable)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return {"device": status.st_dev, "inode": status.st_ino, "size": status.st_size,
            "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns}


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_entries(cache: Path) -> Dict[str, dict]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_entry(cache: Path, key: str, entry: dict) -> None:
    """Add ``entry`` and drop entries whose file is gone or changed; atomic rename, silent on any OS error."""
    entries = {k: v for k, v in _read_entries(cache).items()
               if isinstance(v, dict) and file_signature(k) == v.get("signature")}
    entries[key] = entry
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache.parent, prefix=".sam_fingerprints.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(entries, stream, indent=1)
            os.replace(temporary, cache)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        pass


def load_sam_state_dict_and_fingerprint(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """:func:`load_sam_state_dict` and the weights' fingerprint, from the cache when the file is unchanged.

    The file's signature is taken before and after loading; if it changed in between (the file
    was being replaced) the fingerprint is computed and not cached.
    """
    key = os.path.realpath(path)
    before = file_signature(key)
    state_dict = load_sam_state_dict(path)
    cache = cache_file()
    if cache is None or before is None or file_signature(key) != before:
        return state_dict, sam_fingerprint(state_dict)
    entry = _read_entries(cache).get(key)
    if isinstance(entry, dict) and entry.get("signature") == before and _is_sha256(entry.get("sha256")):
        return state_dict, entry["sha256"]
    fingerprint = sam_fingerprint(state_dict)
    if file_signature(key) == before:
        _write_entry(cache, key, {"signature": before, "sha256": fingerprint})
    return state_dict, fingerprint
