"""Loading SAM checkpoints: architecture derived from tensors, safe loading, clear refusals."""

import pytest
import torch
from segment_anything import sam_model_registry

from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_sam_checkpoint
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_sam, load_sam_state_dict, sam_fingerprint


@pytest.mark.parametrize(
    "model_type, embed_dim, depth, heads, global_blocks",
    [
        ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
        ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
        ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    ],
)
def test_official_architectures_are_derived_from_tensor_shapes(model_type, embed_dim, depth, heads, global_blocks):
    with torch.device("meta"):
        state_dict = sam_model_registry[model_type]().state_dict()
    config = SAMConfig.from_state_dict(state_dict)
    assert (config.encoder_embed_dim, config.encoder_depth, config.encoder_num_heads) == (embed_dim, depth, heads)
    assert config.encoder_global_attn_indexes == global_blocks
    assert (config.img_size, config.patch_size, config.encoder_window_size) == (1024, 16, 14)
    assert (config.prompt_embed_dim, config.transformer_mlp_dim, config.num_mask_tokens) == (256, 2048, 4)
    with torch.device("meta"):
        rebuilt = build_sam(config).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state_dict.items()}


def test_tiny_checkpoint_round_trips_through_the_official_loader(tiny_sam_checkpoint):
    state_dict = load_sam_state_dict(tiny_sam_checkpoint)
    config = SAMConfig.from_state_dict(state_dict)
    assert config.encoder_global_attn_indexes == (1, 3, 5, 7)
    assert (config.img_size, config.encoder_window_size, config.encoder_num_heads) == (128, 4, 2)
    build_sam(config).load_state_dict(state_dict)  # strict: every key and shape matches


def test_generated_checkpoints_are_deterministic(tmp_path):
    first, second, other = (tmp_path / n for n in ("a.pth", "b.pth", "c.pth"))
    write_random_sam_checkpoint(str(first), seed=3)
    write_random_sam_checkpoint(str(second), seed=3)
    write_random_sam_checkpoint(str(other), seed=4)
    fingerprints = [sam_fingerprint(load_sam_state_dict(p)) for p in (first, second, other)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def _assert_one_line_naming(error: SAMCheckpointError, path, expected: str):
    message = str(error)
    assert "\n" not in message
    assert str(path) in message
    assert expected in message
    assert "sam_vit_h_4b8939.pth" in message


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(SAMCheckpointError) as error:
        load_sam_state_dict(path)
    _assert_one_line_naming(error.value, path, "not found")


def test_a_directory_is_refused_as_a_directory(tmp_path):
    with pytest.raises(SAMCheckpointError) as error:
        load_sam_state_dict(tmp_path)
    _assert_one_line_naming(error.value, tmp_path, "is a directory")


def test_truncated_file_is_refused(tiny_sam_checkpoint, tmp_path):
    path = tmp_path / "truncated.pth"
    data = tiny_sam_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAMCheckpointError) as error:
        load_sam_state_dict(path)
    _assert_one_line_naming(error.value, path, "truncated, corrupted")


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(SAMCheckpointError) as error:
        load_sam_state_dict(path)
    _assert_one_line_naming(error.value, path, "cannot read")


def test_file_that_is_not_a_sam_checkpoint_is_refused(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(SAMCheckpointError) as error:
        load_sam_state_dict(path)
    _assert_one_line_naming(error.value, path, "is not a SAM checkpoint: key 'image_encoder.patch_embed.proj.weight' is missing")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_file_that_would_run_code_is_refused_unopened(tmp_path, capsys):
    path = tmp_path / "malicious.pth"
    torch.save({"payload": _RunsCode()}, path)
    with pytest.raises(SAMCheckpointError):
        load_sam_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out
