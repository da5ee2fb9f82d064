"""The SAM fingerprint is hashed once per version of a file and read from a cache while the file is unchanged."""

import json
import os
import time
from unittest import mock

import pytest

from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_sam_checkpoint
from nnunetv2_desam.networks import fingerprint_cache
from nnunetv2_desam.networks.desam import DeSAM
from nnunetv2_desam.networks.fingerprint_cache import cache_file, load_sam_state_dict_and_fingerprint
from nnunetv2_desam.networks.sam_checkpoint import load_sam_state_dict, sam_fingerprint


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hashing():
    """Counts the SHA-256 passes over SAM weights made through the cache."""
    with mock.patch.object(fingerprint_cache, "sam_fingerprint", wraps=sam_fingerprint) as spy:
        yield spy


def fingerprint_of(path) -> str:
    return sam_fingerprint(load_sam_state_dict(path))


def test_an_unchanged_file_is_hashed_once_and_a_rewritten_or_replaced_one_again(tmp_path, cache_home, hashing):
    path, other = tmp_path / "sam.pth", tmp_path / "other" / "sam.pth"  # same name: torch.save files of the same size
    other.parent.mkdir()
    write_random_sam_checkpoint(str(path), seed=0)
    write_random_sam_checkpoint(str(other), seed=1)
    first, second = fingerprint_of(path), fingerprint_of(other)
    assert first != second

    assert DeSAM.from_sam_checkpoint(path, 1, 3).fingerprint == first and hashing.call_count == 1
    assert DeSAM.from_sam_checkpoint(path, 1, 3).fingerprint == first and hashing.call_count == 1  # from the cache
    assert cache_file() == cache_home / "nnunetv2_desam" / "sam_fingerprints.json"
    assert json.loads(cache_file().read_text())[os.path.realpath(path)]["sha256"] == first

    # rewritten in place with other weights of the same size, the modification time put back: the
    # status-change time still differs (it moves on with every write and cannot be set back)
    status = os.stat(path)
    time.sleep(0.05)  # past the file system's timestamp granularity
    path.write_bytes(other.read_bytes())
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.stat(path).st_ino == status.st_ino and os.stat(path).st_size == status.st_size
    assert load_sam_state_dict_and_fingerprint(path)[1] == second and hashing.call_count == 2

    write_random_sam_checkpoint(str(other), seed=2)  # replaced by renaming another file over it
    os.replace(other, path)
    assert load_sam_state_dict_and_fingerprint(path)[1] == fingerprint_of(path) != second and hashing.call_count == 3
    assert load_sam_state_dict_and_fingerprint(path)[1] == fingerprint_of(path) and hashing.call_count == 3


def test_a_corrupt_or_unwritable_cache_never_stops_a_build(tmp_path, cache_home, hashing, tiny_sam_checkpoint):
    expected = fingerprint_of(tiny_sam_checkpoint)
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text('{"truncated')
    assert load_sam_state_dict_and_fingerprint(tiny_sam_checkpoint)[1] == expected
    entries = json.loads(cache_file().read_text())  # rewritten whole
    entry = entries[os.path.realpath(tiny_sam_checkpoint)]
    entry["sha256"] = "not a fingerprint"
    cache_file().write_text(json.dumps(entries))
    assert load_sam_state_dict_and_fingerprint(tiny_sam_checkpoint)[1] == expected and hashing.call_count == 2

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(blocked)}):  # cannot be created, even as root
        assert load_sam_state_dict_and_fingerprint(tiny_sam_checkpoint)[1] == expected
        assert load_sam_state_dict_and_fingerprint(tiny_sam_checkpoint)[1] == expected and hashing.call_count == 4
    assert not list(tmp_path.glob("**/.sam_fingerprints.*.tmp"))


def test_entries_of_removed_or_changed_files_are_dropped(tmp_path, cache_home):
    paths = [tmp_path / f"sam_{i}.pth" for i in range(3)]
    for seed, path in enumerate(paths[:2]):
        write_random_sam_checkpoint(str(path), seed=seed)
        load_sam_state_dict_and_fingerprint(path)
    paths[0].unlink()
    write_random_sam_checkpoint(str(paths[2]), seed=2)
    load_sam_state_dict_and_fingerprint(paths[2])
    assert set(json.loads(cache_file().read_text())) == {os.path.realpath(p) for p in paths[1:]}
