"""SAMed and MedSAM networks against segment_anything's own modules; what trains; slim and full checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from segment_anything import sam_model_registry

from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.experiments.random_sam_checkpoint import write_random_sam_checkpoint
from nnunetv2_desam.networks.desam import DeSAM
from nnunetv2_desam.networks.frozen_sam_weights import FINGERPRINT_KEY
from nnunetv2_desam.networks.medsam import MedSAM, PerClassDiceBCELoss, binary_logits, per_class_log_scores
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_image_encoder, build_sam, load_sam_state_dict, sub_state_dict
from nnunetv2_desam.networks.samed import LoRAQV, SAMed


@pytest.fixture(scope="module")
def sam_state_dict(tiny_sam_checkpoint):
    return load_sam_state_dict(tiny_sam_checkpoint)


@pytest.fixture(scope="module")
def reference_sam(sam_state_dict):
    sam = build_sam(SAMConfig.from_state_dict(sam_state_dict))
    sam.load_state_dict(sam_state_dict)
    return sam.eval()


def make_samed(sam_state_dict, classes=3, **kwargs) -> SAMed:
    torch.manual_seed(0)
    return SAMed(sam_state_dict, 1, classes, **kwargs)


def make_medsam(sam_state_dict, classes=3, channels=1, **kwargs) -> MedSAM:
    torch.manual_seed(0)
    return MedSAM.from_sam_state_dict(sam_state_dict, channels, classes, **kwargs)


def randomise_lora(network: SAMed) -> None:
    """LoRA's B starts at zero; give it values so that the adaptation shows."""
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_" in name and "_b." in name:
                parameter.normal_(std=0.2)


# ---------------------------------------------------------------------------------------------
# SAMed


def test_lora_changes_the_query_and_value_thirds_of_qkv_by_b_a_x_and_leaves_the_key_alone():
    torch.manual_seed(0)
    qkv = torch.nn.Linear(8, 24)
    lora = LoRAQV(qkv, rank=2)
    x = torch.randn(2, 3, 3, 8)
    assert torch.equal(lora(x), qkv(x))  # B = 0 at start
    with torch.no_grad():
        lora.lora_q_b.weight.normal_()
        lora.lora_v_b.weight.normal_()
    q, k, v = lora(x).split(8, dim=-1)
    q0, k0, v0 = qkv(x).split(8, dim=-1)
    assert torch.equal(k, k0)
    assert torch.allclose(q, q0 + x @ lora.lora_q_a.weight.T @ lora.lora_q_b.weight.T, atol=1e-6)
    assert torch.allclose(v, v0 + x @ lora.lora_v_a.weight.T @ lora.lora_v_b.weight.T, atol=1e-6)


@pytest.mark.parametrize("fused_attention", [True, False])
def test_samed_encoder_is_sam_at_half_the_input_size_with_segment_anything_resampling_its_positions(sam_state_dict, fused_attention):
    """With LoRA at zero, SAMed's encoder is SAM's at 64² (the file's 128² halved): pos_embed resized
    bilinearly, the global blocks' relative positions as segment_anything's get_rel_pos resamples them."""
    network = make_samed(sam_state_dict, fused_attention=fused_attention)
    config = SAMConfig.from_state_dict(sam_state_dict)
    reference = build_image_encoder(SAMConfig(**{**config.to_dict(), "img_size": 64}))
    weights = sub_state_dict(sam_state_dict, "image_encoder.")
    pos_embed = F.interpolate(weights.pop("pos_embed").permute(0, 3, 1, 2), size=(4, 4), mode="bilinear", align_corners=False)
    reference.pos_embed = torch.nn.Parameter(pos_embed.permute(0, 2, 3, 1))
    global_tables = {key: weights.pop(key) for key in list(weights) if weights[key].shape != reference.get_parameter(key).shape}
    assert len(global_tables) == 2 * len(config.encoder_global_attn_indexes)
    reference.load_state_dict(weights, strict=False)
    for key, table in global_tables.items():  # the file's 15-long tables: get_rel_pos resamples them on the fly
        block, name = key.rsplit(".", 1)
        setattr(reference.get_submodule(block), name, torch.nn.Parameter(table))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert (network.image_encoder(images) - reference(images)).abs().max() < 1e-5


def test_samed_trains_only_lora_on_q_and_v_the_decoder_and_the_no_mask_embedding(sam_state_dict):
    network = make_samed(sam_state_dict, classes=3)
    config = network.sam_config
    trainable = {name: p.numel() for name, p in network.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    assert len(lora) == 4 * config.encoder_depth
    assert sum(trainable[n] for n in lora) == config.encoder_depth * 2 * 2 * config.encoder_embed_dim * 4
    decoder = sum(p.numel() for p in network.mask_decoder.parameters())
    assert set(trainable) - lora == {f"mask_decoder.{n}" for n, _ in network.mask_decoder.named_parameters()} | {"prompt_encoder.no_mask_embed.weight"}
    assert sum(trainable.values()) == sum(trainable[n] for n in lora) + decoder + config.prompt_embed_dim
    assert network.mask_decoder.mask_tokens.num_embeddings == 3 and len(network.mask_decoder.output_hypernetworks_mlps) == 3


def test_samed_decoder_keeps_sam_weights_except_the_class_dependent_layers(sam_state_dict):
    network = make_samed(sam_state_dict)
    decoder = network.mask_decoder.state_dict()
    for key, tensor in sub_state_dict(sam_state_dict, "mask_decoder.").items():
        if key.startswith(("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")):
            assert key not in decoder
        else:
            assert torch.equal(decoder[key], tensor), key
    assert all(key.startswith("seg_layers.") for key in decoder if "mask_tokens" in key or "hypernetworks" in key)


def test_samed_outputs_one_logit_per_class_for_any_number_of_channels(sam_state_dict):
    network = SAMed(sam_state_dict, 2, 4)
    assert network(torch.randn(3, 2, 40, 56)).shape == (3, 4, 40, 56)


def test_samed_checkpoint_holds_only_what_trains_and_round_trips(sam_state_dict, tiny_sam_checkpoint):
    network = make_samed(sam_state_dict)
    randomise_lora(network)
    state = network.state_dict()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert set(state) == trainable | {FINGERPRINT_KEY}
    rebuilt = SAMed.from_sam_checkpoint(tiny_sam_checkpoint, 1, 3)
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), network(x))
        assert not torch.allclose(make_samed(sam_state_dict)(x), network(x))


def test_samed_weights_are_refused_with_another_sam_file(sam_state_dict, other_tiny_sam_checkpoint):
    state = make_samed(sam_state_dict).state_dict()
    other = SAMed.from_sam_checkpoint(other_tiny_sam_checkpoint, 1, 3)
    with pytest.raises(SAMCheckpointError, match="these SAMed weights were trained with SAM weights of fingerprint"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# MedSAM


def test_medsam_input_is_desams_intensity_map_in_the_0_to_1_range_resized_to_the_square(sam_state_dict):
    """MedSAM and SAMed feed [0, 1] images: DeSAM's intensity window and channel mixing divided by 255,
    stretched to the square encoder input as their authors resize (DeSAM keeps the aspect ratio)."""
    x = torch.randn(2, 2, 40, 56) * 2 + 1
    windows = [(-1.0, 6.0), (-2.0, 3.0)]
    desam = DeSAM(sam_state_dict, 2, 3, intensity_windows=windows)
    expected = F.interpolate(desam.sam_input.rgb(x) / 255, (128, 128), mode="bilinear", align_corners=False, antialias=True)
    images = make_medsam(sam_state_dict, channels=2, intensity_windows=windows).sam_input(x)
    assert images.shape == (2, 3, 128, 128) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images, expected, atol=1e-5)
    assert not torch.allclose(make_medsam(sam_state_dict, channels=2).sam_input(x), images, atol=1e-3)


def test_medsam_is_segment_anythings_box_prediction_for_one_class_before_training(sam_state_dict, reference_sam):
    """Class offsets at zero: the foreground logit is Sam's single-mask output for the whole-image box."""
    network = make_medsam(sam_state_dict, classes=2).eval()
    x = torch.randn(2, 1, 40, 56)
    with torch.no_grad():
        embeddings = reference_sam.image_encoder(network.sam_input(x))
        sparse, dense = reference_sam.prompt_encoder(points=None, boxes=torch.tensor([[0.0, 0.0, 128.0, 128.0]]), masks=None)
        expected = []
        for embedding in embeddings:
            low_res, _ = reference_sam.mask_decoder(embedding[None], reference_sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
            expected.append(F.interpolate(low_res, size=(40, 56), mode="bilinear", align_corners=False))
        assert (network.foreground_logits(x) - torch.cat(expected)).abs().max() < 1e-4


def test_medsam_passes_differ_by_class_once_the_class_offsets_differ(sam_state_dict):
    network = make_medsam(sam_state_dict, classes=4).eval()
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        logits = network.foreground_logits(x)
        assert torch.equal(logits[:, 0], logits[:, 1]) and torch.equal(logits[:, 1], logits[:, 2])
        network.class_prompts.seg_layers.weight.normal_()
        logits = network.foreground_logits(x)
    assert not torch.allclose(logits[:, 0], logits[:, 1]) and not torch.allclose(logits[:, 1], logits[:, 2])


def test_medsam_trains_encoder_and_decoder_but_not_the_prompt_encoder_nor_the_unused_iou_head(sam_state_dict):
    network = make_medsam(sam_state_dict, classes=3)
    trainable = {name: p.numel() for name, p in network.named_parameters() if p.requires_grad}
    expected = (sum(p.numel() for p in network.image_encoder.parameters()) + sum(p.numel() for p in network.mask_decoder.parameters())
                - sum(p.numel() for p in network.mask_decoder.iou_prediction_head.parameters()) + 2 * network.sam_config.prompt_embed_dim)
    assert sum(trainable.values()) == expected
    assert not any(name.startswith("prompt_encoder.") or "iou_prediction_head" in name for name in trainable)


@pytest.mark.parametrize("options", [{"gradient_checkpointing": False}, {"fused_attention": False}])
def test_medsam_gradients_equal_with_checkpointing_and_fused_attention(sam_state_dict, options):
    x, target = torch.randn(2, 1, 48, 48), (torch.rand(2, 1, 48, 48) * 3).long()
    gradients = []
    for network in (make_medsam(sam_state_dict), make_medsam(sam_state_dict, **options)):
        with torch.no_grad():
            network.class_prompts.seg_layers.weight.normal_(generator=torch.Generator().manual_seed(0))
        network.train()
        loss = F.nll_loss(F.log_softmax(network(x), 1), target[:, 0])
        loss.backward()
        gradients.append({name: p.grad for name, p in network.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    assert any(name.startswith("image_encoder.blocks.0.") for name in gradients[0])
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradient, gradients[1][name], atol=1e-5, rtol=1e-3), name


def test_medsam_checkpoint_rebuilds_without_a_sam_file(sam_state_dict):
    network = make_medsam(sam_state_dict)
    with torch.no_grad():
        network.class_prompts.seg_layers.weight.normal_()
    state = network.state_dict()
    assert {key for key in state if not key.startswith("class_prompts.")} == set(sam_state_dict)
    rebuilt = MedSAM(SAMConfig.from_dict(network.sam_config.to_dict()), 1, 3)
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), network(x))


def test_medsam_accepts_a_file_in_medsam_vit_b_layout(tmp_path):
    """MedSAM's released medsam_vit_b.pth is SAM ViT-B's state dict with MedSAM's weights: same keys, same shapes."""
    path = tmp_path / "medsam_vit_b.pth"
    write_random_sam_checkpoint(str(path), img_size=1024, embed_dim=768, depth=12, num_heads=12, window_size=14,
                                global_attn_indexes=(2, 5, 8, 11), prompt_embed_dim=256, transformer_mlp_dim=2048, seed=3)
    state_dict = load_sam_state_dict(path)
    assert set(state_dict) == set(sam_model_registry["vit_b"]().state_dict())
    network = MedSAM.from_sam_state_dict(state_dict, 1, 2)
    assert network.sam_config.encoder_embed_dim == 768 and network.sam_config.encoder_global_attn_indexes == (2, 5, 8, 11)
    # train_one_gpu.py prints 93735472 parameters for MedSAM ViT-B; ours adds one 256-wide class offset
    assert sum(p.numel() for p in network.parameters()) == 93735472 + 256
    weights = network.state_dict()
    assert all(torch.equal(weights[key], tensor) for key, tensor in state_dict.items())


def test_combined_scores_are_medsams_probability_for_one_class_and_the_documented_rule_for_several():
    z = torch.randn(2, 1, 5, 5) * 4
    probabilities = per_class_log_scores(z).softmax(1)
    assert torch.allclose(probabilities[:, 1:], torch.sigmoid(z), atol=1e-6)
    z = torch.randn(2, 3, 7, 7) * 4
    p = torch.sigmoid(z)
    scores = torch.cat([(1 - p).prod(1, keepdim=True), p], 1)
    assert torch.allclose(per_class_log_scores(z).softmax(1), scores / scores.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(per_class_log_scores(z).argmax(1), scores.argmax(1))


def test_binary_logits_invert_the_combination():
    z = torch.linspace(-60, 60, 1201).view(1, 1, -1).repeat(2, 3, 1)
    assert torch.allclose(binary_logits(per_class_log_scores(z)), z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("ignore_label", [None, 3])
def test_medsam_loss_on_log_scores_is_nnunets_dice_and_bce_on_the_binary_logits(ignore_label):
    torch.manual_seed(0)
    z = (torch.randn(2, 2, 16, 16) * 3).requires_grad_()
    target = torch.randint(0, 3 if ignore_label is None else 4, (2, 1, 16, 16)).float()
    kwargs = {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False}
    ours = PerClassDiceBCELoss(DC_and_BCE_loss({}, dict(kwargs), use_ignore_label=ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss), 3, ignore_label)
    loss = ours(per_class_log_scores(z), target)
    (gradient,) = torch.autograd.grad(loss, z)
    channels = [target[:, 0] == 1, target[:, 0] == 2] + ([target[:, 0] == ignore_label] if ignore_label else [])
    reference = DC_and_BCE_loss({}, dict(kwargs), use_ignore_label=ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss)
    expected = reference(z, torch.stack(channels, 1))
    (expected_gradient,) = torch.autograd.grad(expected, z)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(gradient, expected_gradient, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# both


@pytest.mark.parametrize("make", [make_samed, make_medsam])
def test_pretrained_weights_from_another_class_count_transfer_all_but_the_seg_layers(make, sam_state_dict, tmp_path):
    """nnUNetv2_train -pretrained_weights skips keys containing '.seg_layers.': the class-dependent layers must be named so."""
    source = make(sam_state_dict, classes=3)
    with torch.no_grad():
        for parameter in source.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)
    path = tmp_path / "pretrained.pth"
    torch.save({"network_weights": source.state_dict()}, path)
    target = make(sam_state_dict, classes=5)
    before = {key: tensor.clone() for key, tensor in target.state_dict().items()}
    load_pretrained_weights(target, str(path))
    transferred = target.state_dict()
    assert any(".seg_layers." in key for key in transferred)
    for key, tensor in transferred.items():
        assert torch.equal(tensor, before[key] if ".seg_layers." in key else source.state_dict()[key]), key
