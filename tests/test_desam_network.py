"""The DeSAM module: equality with segment_anything's own modules, shapes, freezing, ablations."""

from unittest import mock

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings, cpu_has_native_bf16, prompt_passes, prompts_that_count
from nnunetv2_desam.networks.prompts import grid_points
from nnunetv2_desam.networks.pdmm import PDMM
from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, build_sam, load_sam_state_dict

FULL = DeSAMSettings()
BOX = DeSAMSettings(prompt_mode="box", use_iou_head=False)
PDMM_ONLY = DeSAMSettings(prompt_mode="none", use_prim=False, use_iou_head=False, fuse_mask_embedding=False)
NO_IOU_HEAD = DeSAMSettings(use_iou_head=False)
NO_MEF = DeSAMSettings(fuse_mask_embedding=False)
ALL_SETTINGS = [FULL, BOX, PDMM_ONLY, NO_IOU_HEAD, NO_MEF]


@pytest.fixture(scope="module")
def sam_state_dict(tiny_sam_checkpoint):
    return load_sam_state_dict(tiny_sam_checkpoint)


@pytest.fixture(scope="module")
def reference_sam(sam_state_dict):
    sam = build_sam(SAMConfig.from_state_dict(sam_state_dict))
    sam.load_state_dict(sam_state_dict)
    return sam.eval()


def make_desam(sam_state_dict, channels=1, classes=3, settings=FULL, **kwargs) -> DeSAM:
    """Seeded; the encoder in fp32 (these tests compare with segment_anything's modules to 1e-5)."""
    torch.manual_seed(0)
    return DeSAM(sam_state_dict, channels, classes, settings, **{"cpu_bf16": False, **kwargs})


def test_encoder_taps_match_a_hand_written_pass_through_segment_anything_blocks(sam_state_dict, reference_sam):
    network = make_desam(sam_state_dict).eval()
    images = torch.randn(2, 3, 128, 128)
    encoder = reference_sam.image_encoder
    with torch.no_grad():
        x = encoder.patch_embed(images) + encoder.pos_embed
        expected_taps = []
        for index, block in enumerate(encoder.blocks):
            x = block(x)
            if index in (1, 3, 5):
                expected_taps.append(x.permute(0, 3, 1, 2))
        expected_neck = encoder.neck(x.permute(0, 3, 1, 2))
        assert torch.allclose(expected_neck, encoder(images), atol=1e-6)
        taps, neck = network.image_encoder(images)
    assert len(taps) == 3
    for tap, expected in zip(taps, expected_taps):
        assert tap.shape == (2, 32, 8, 8)
        assert (tap - expected).abs().max() < 1e-5
    assert (neck - expected_neck).abs().max() < 1e-5


def test_prim_matches_what_sam_mask_decoder_computes_internally(sam_state_dict, reference_sam):
    network = make_desam(sam_state_dict, classes=4).eval()
    embedding = torch.randn(1, 32, 8, 8)
    points = torch.tensor([[[30.0, 40.0]], [[100.0, 12.0]], [[64.0, 64.0]]])
    labels = torch.ones(3, 1, dtype=torch.int64)
    captured = {}
    hook = reference_sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.update(keys=o[1]))
    with torch.no_grad():
        sparse, dense = reference_sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        _, sam_iou = reference_sam.mask_decoder.predict_masks(
            embedding, reference_sam.prompt_encoder.get_dense_pe(), sparse, dense
        )
        mask_embedding, iou = network.prim(embedding, network.prompt_encoder.get_dense_pe(), sparse, dense)
    hook.remove()
    sam_mask_embedding = captured["keys"].transpose(1, 2).reshape(3, 32, 8, 8)
    assert (mask_embedding - sam_mask_embedding).abs().max() < 1e-5
    assert iou.shape == (3, 3)  # one IoU per foreground class, each starting as SAM's first output
    for k in range(3):
        assert (iou[:, k] - sam_iou[:, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("channels, classes", [(1, 2), (3, 5), (2, 2), (4, 3)])
@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: f"{s.prompt_mode}-prim{s.use_prim}-iou{s.use_iou_head}-mef{s.fuse_mask_embedding}")
def test_output_shapes_for_odd_patch_sizes(sam_state_dict, settings, channels, classes):
    network = make_desam(sam_state_dict, channels, classes, DeSAMSettings(**{**settings.to_dict(), "grid_size": 3})).eval()
    x = torch.randn(2, channels, 192, 160)
    with torch.no_grad():
        assert network(x).shape == (2, classes, 192, 160)
        network.decoder.deep_supervision = True
        full, half = network(x)
        logits, iou = network(x, points=torch.tensor([[[5.0, 7.0]], [[150.0, 180.0]]]))
    assert full.shape == (2, classes, 192, 160) and half.shape == (2, classes, 96, 80)
    assert [o.shape for o in logits] == [full.shape, half.shape]
    has_iou = settings.use_prim and settings.use_iou_head
    assert (iou.shape == (2, 1, classes - 1)) if has_iou else iou is None


def test_prompts_are_continuous_patch_coordinates_scaled_like_segment_anything(sam_state_dict):
    """Points and box corners in patch pixels (pixel (i, j) spans [j, j+1) × [i, i+1)) reach SAM's prompt
    encoder as the same continuous points of the longest-side-resized input: a 64×32 patch fills 128×64
    of the 128×128 input (scale 2), and SAM's half-pixel shift is undone."""
    network = make_desam(sam_state_dict, settings=BOX).eval()
    x = torch.randn(1, 1, 64, 32)
    captured = []
    network.prim.register_forward_hook(lambda m, i, o: captured.append(i[2]))
    with torch.no_grad():
        automatic = network(x)
        whole, _ = network(x, boxes=torch.tensor([[0.0, 0.0, 32.0, 64.0]]))
        part, _ = network(x, boxes=torch.tensor([[4.0, 8.0, 20.0, 30.0]]))
        network(x, points=torch.tensor([[[5.0, 5.0], [20.0, 40.0]]]), point_labels=torch.tensor([[1, 0]]))
    encoder = network.prompt_encoder

    def sam_box(corners):  # SAM's box embedding of continuous corners (x0, y0), (x1, y1) in the 128×128 input
        embedding = encoder.pe_layer.forward_with_coords(torch.tensor([corners]), (128, 128))
        return embedding + torch.cat([encoder.point_embeddings[2].weight, encoder.point_embeddings[3].weight])

    assert torch.equal(automatic, whole) and not torch.equal(automatic, part)
    assert torch.allclose(captured[0], sam_box([[0.0, 0.0], [64.0, 128.0]]), atol=1e-5)
    assert torch.allclose(captured[2], sam_box([[8.0, 16.0], [40.0, 60.0]]), atol=1e-5)
    point_prompts = captured[3]  # two prompts, each a point then SAM's padding token
    assert point_prompts.shape == (2, 2, 32)
    foreground, background = encoder.point_embeddings[1].weight, encoder.point_embeddings[0].weight
    positional = encoder.pe_layer.forward_with_coords(torch.tensor([[[10.0, 10.0]], [[40.0, 80.0]]]), (128, 128))
    assert torch.allclose(point_prompts[:, 0], positional[:, 0] + torch.cat([foreground, background]), atol=1e-5)


def test_grid_mode_runs_one_prompt_per_grid_point(sam_state_dict):
    network = make_desam(sam_state_dict, settings=DeSAMSettings(grid_size=4)).eval()
    calls = []
    network.prim.register_forward_hook(lambda m, i, o: calls.append(i[2].shape[0]))
    with torch.no_grad():
        network(torch.randn(2, 1, 64, 64))
    assert calls == [16, 16]  # 2 × 16 pairs exceed the default 27 per pass: one image per pass


@pytest.mark.parametrize("batch, prompts, pairs, expected_passes", [(8, 81, 27, 24), (8, 9, 27, 3), (2, 25, 4, 14), (3, 25, 50, 2), (1, 81, 1000, 1)])
def test_prompt_passes_cover_every_pair_once_within_the_bound(batch, prompts, pairs, expected_passes):
    """nnU-Net's validation batch of 8 with the 9×9 grid: 24 passes of 27 pairs, not 8 × 27 at once."""
    passes = prompt_passes(batch, prompts, pairs)
    covered = torch.zeros(batch, prompts, dtype=torch.int64)
    for images, chosen in passes:
        covered[images, chosen] += 1
        assert covered[images, chosen].numel() <= pairs
    assert torch.equal(covered, torch.ones_like(covered))
    assert len(passes) == expected_passes


def test_frozen_parts_get_no_gradient_and_one_step_changes_only_prim_and_pdmm(sam_state_dict):
    network = make_desam(sam_state_dict).train()
    assert not network.image_encoder.training and not network.prompt_encoder.training
    frozen = {n: p.detach().clone() for n, p in network.named_parameters() if n.startswith(("image_encoder", "prompt_encoder"))}
    assert frozen and not any(p.requires_grad for n, p in network.named_parameters() if n in frozen)
    trainable = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}
    assert all(n.startswith(("prim.", "decoder.")) for n in trainable)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    network.decoder.deep_supervision = True
    (full, half), iou = network(torch.randn(2, 1, 64, 64), points=torch.tensor([[[3.0, 3.0]], [[40.0, 20.0]]]))
    (full.mean() + half.mean() + iou.mean()).backward()
    assert all(p.grad is None for n, p in network.named_parameters() if n in frozen)
    optimizer.step()
    after = dict(network.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in frozen.items())
    changed = [n for n, value in trainable.items() if not torch.equal(after[n], value)]
    assert len(changed) == len(trainable)


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: f"{s.prompt_mode}-prim{s.use_prim}-iou{s.use_iou_head}-mef{s.fuse_mask_embedding}")
def test_every_trainable_parameter_is_used_in_training(sam_state_dict, settings):
    """DDP without find_unused_parameters needs a gradient for every trainable parameter."""
    network = make_desam(sam_state_dict, settings=settings).train()
    network.decoder.deep_supervision = True
    x = torch.randn(2, 1, 64, 64)
    if settings.prompt_mode == "points" and settings.use_prim:
        outputs, iou = network(x, points=torch.tensor([[[3.0, 3.0]], [[40.0, 20.0]]]))
    else:
        outputs, iou = network(x), None
    loss = sum(o.mean() for o in outputs) + (iou.mean() if iou is not None else 0)
    loss.backward()
    unused = [n for n, p in network.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert unused == []


def count_trainable(network) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def test_ablation_switches_remove_what_they_should(sam_state_dict):
    networks = {s: make_desam(sam_state_dict, settings=s) for s in ALL_SETTINGS}
    full = networks[FULL]
    iou_head = sum(p.numel() for p in full.prim.iou_prediction_head.parameters())
    final_attention = sum(
        p.numel() for m in (full.prim.transformer.final_attn_token_to_image, full.prim.transformer.norm_final_attn) for p in m.parameters()
    )
    fusion = sum(p.numel() for p in full.decoder.mask_embedding_fusion.parameters())
    prim = sum(p.numel() for p in full.prim.parameters())
    assert count_trainable(networks[NO_IOU_HEAD]) == count_trainable(full) - iou_head - final_attention
    assert count_trainable(networks[NO_MEF]) == count_trainable(full) - fusion
    assert count_trainable(networks[PDMM_ONLY]) == count_trainable(full) - prim - fusion
    assert count_trainable(networks[BOX]) == count_trainable(networks[NO_IOU_HEAD])
    assert networks[PDMM_ONLY].prim is None and networks[NO_MEF].decoder.mask_embedding_fusion is None


def test_pdmm_size_matches_the_reference_for_vit_h():
    parameters = sum(p.numel() for p in PDMM(tap_channels=(1280,) * 3, tap_grids=(64,) * 3, width=256, num_classes=1, fuse_mask_embedding=True).parameters())
    assert abs(parameters - 9.757e6) / 9.757e6 < 0.02


RULES = {"gated": 3, "mean": 3, "authors": 2}  # rule: classes (the authors' sequence is binary)


def spread_iou_head(network: DeSAM, x: torch.Tensor, centres=(0.5, 0.4), scale=10.0) -> None:
    """A set IoU head: its last layer ×``scale`` and shifted so that the grid prompts' IoUs on ``x`` have the given
    median per class; the prompts then score on both sides of the 0.5 threshold."""
    layer = network.prim.iou_prediction_head.seg_layers[0]
    points = grid_points(network.settings.grid_size, tuple(x.shape[-2:])).expand(x.shape[0], -1, -1)
    with torch.no_grad():
        layer.weight.mul_(scale), layer.bias.mul_(scale)
        _, iou = network(x, points=points)
        layer.bias.add_(torch.tensor(centres[: iou.shape[-1]]) - iou.flatten(0, 1).median(0).values)


def grid_pair(sam_state_dict, settings, rule, x, reference_kwargs, **kwargs):
    """Two networks with the same weights (a set IoU head) and grid rule, built with different decoding options."""
    settings = DeSAMSettings(**{**settings.to_dict(), "grid_size": 5, "grid_aggregation": rule})
    network = make_desam(sam_state_dict, classes=RULES[rule], settings=settings, **kwargs).eval()
    if network.prim.iou_prediction_head is not None:
        spread_iou_head(network, x)
    reference = make_desam(sam_state_dict, classes=RULES[rule], settings=settings, **reference_kwargs).eval()
    reference.load_state_dict(network.state_dict())
    return network, reference


def assert_same_combination(output: torch.Tensor, reference: torch.Tensor) -> None:
    """Same probabilities (compared as probabilities: near the 1e-8 floor log-space differences are noise) and segmentation."""
    assert (output.exp() - reference.exp()).abs().max() < 1e-5
    assert torch.equal(output.argmax(1), reference.argmax(1))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("settings", [FULL, NO_IOU_HEAD, NO_MEF], ids=["full", "no-iou-head", "no-mef"])
def test_prompt_shared_decoding_equals_decoding_every_prompt_independently(sam_state_dict, settings, rule):
    x = torch.randn(2, 1, 96, 80)
    shared, reference = grid_pair(sam_state_dict, settings, rule, x, {"prompt_shared_decoding": False})
    with torch.no_grad():
        fast, slow = shared(x), reference(x)
    assert_same_combination(fast, slow)


@pytest.mark.parametrize("rule", ["gated", "authors"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-prompt"])
def test_skipping_gated_off_prompts_equals_decoding_every_prompt(sam_state_dict, rule, shared):
    """2 images × 5×5 grid, IoUs on both sides of 0.5 and the two classes' IoUs ranking the prompts in opposite
    order (so some prompts pass for one class only): PDMM only for the prompts that pass gives the same result."""
    x = torch.randn(2, 1, 96, 80, generator=torch.Generator().manual_seed(0))
    skipping, reference = grid_pair(sam_state_dict, FULL, rule, x, {"skip_gated_off_prompts": False, "prompt_shared_decoding": shared},
                                    prompt_shared_decoding=shared, prompt_chunk_size=10)
    points = grid_points(5, (96, 80)).expand(2, -1, -1)
    with torch.no_grad():
        if rule == "gated":
            layer = skipping.prim.iou_prediction_head.seg_layers[0]
            layer.weight[1] = -layer.weight[0]
            spread_iou_head(skipping, x, centres=(0.3, 0.3), scale=1.0)
            reference.load_state_dict(skipping.state_dict())
        _, iou = reference(x, points=points)
        counting = prompts_that_count(iou, rule)
        assert 0 < int(counting.sum()) < counting.numel()  # some prompts are skipped, some decoded
        assert rule != "gated" or bool(((iou > 0.5).sum(-1) == 1).any())  # some pass for one class only
        with mock.patch.object(skipping.decoder, "decode", wraps=skipping.decoder.decode) as decode:
            assert_same_combination(skipping(x), reference(x))
    assert sum(call.args[1].shape[0] for call in decode.call_args_list) == int(counting.sum())  # mask embeddings decoded


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: the network runs in fp32")
def test_the_gated_grid_skips_prompts_under_bf16_autocast_too(sam_state_dict):
    """PRIM's mask embedding leaves autocast in fp32 (its last op is a LayerNorm), PDMM's logits in bf16: the skipped
    prompts' zeros and the decoded prompts' logits meet in fp32, and the result matches decoding every prompt."""
    assert DeSAM(sam_state_dict, 1, 2).cpu_bf16 is False  # by default only from 256² encoders on: this one is 128²
    x = torch.randn(2, 1, 96, 80, generator=torch.Generator().manual_seed(0))
    bf16 = {"cpu_bf16": True}
    skipping, reference = grid_pair(sam_state_dict, FULL, "gated", x, {**bf16, "skip_gated_off_prompts": False}, **bf16)
    with torch.no_grad():
        _, iou = skipping(x, points=grid_points(5, (96, 80)).expand(2, -1, -1))
        counting = prompts_that_count(iou, "gated")
        output, expected = skipping(x), reference(x)
    assert 0 < int(counting.sum()) < counting.numel() and output.dtype == torch.float32
    assert (output.exp() - expected.exp()).abs().max() < 1e-2
    assert (output.argmax(1) == expected.argmax(1)).float().mean() > 0.99


def test_a_grid_where_no_prompt_passes_is_background_without_decoding(sam_state_dict):
    x = torch.randn(1, 1, 64, 64)
    network = make_desam(sam_state_dict, settings=DeSAMSettings(grid_size=3)).eval()
    head = network.prim.iou_prediction_head.seg_layers[0]
    with torch.no_grad():
        head.weight.zero_(), head.bias.fill_(-5.0)
        with mock.patch.object(network.decoder, "decode", wraps=network.decoder.decode) as decode:
            output = network(x)
    assert decode.call_count == 0
    assert output.shape == (1, 3, 64, 64) and bool((output.argmax(1) == 0).all())


def test_fused_encoder_attention_equals_segment_anything_attention(sam_state_dict):
    fused = make_desam(sam_state_dict, settings=DeSAMSettings(grid_size=3)).eval()
    reference = make_desam(sam_state_dict, settings=fused.settings, fused_attention=False).eval()
    reference.load_state_dict(fused.state_dict())
    assert type(fused.image_encoder.encoder.blocks[0].attn) is not type(reference.image_encoder.encoder.blocks[0].attn)
    x = torch.randn(2, 1, 80, 96)
    with torch.no_grad():
        assert (fused(x) - reference(x)).abs().max() < 1e-4


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("settings", [FULL, NO_IOU_HEAD], ids=["full", "no-iou-head"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-prompt"])
@pytest.mark.parametrize("pairs", [4, 25], ids=["4-pairs", "25-pairs"])
def test_grid_prompts_in_chunks_equal_all_prompts_at_once(sam_state_dict, settings, shared, rule, pairs):
    """2 images × 5×5 grid: all 50 image·prompt pairs in one pass against passes of 4 (4, 4, …, 1 per image)
    or 25 (one image each): same probabilities, segmentation and IoUs, for every rule."""
    x = torch.randn(2, 1, 96, 80)
    in_chunks, at_once = grid_pair(sam_state_dict, settings, rule, x, {"prompt_shared_decoding": shared, "prompt_chunk_size": 50},
                                   prompt_shared_decoding=shared, prompt_chunk_size=pairs)
    points = grid_points(5, (96, 80)).expand(2, -1, -1)
    with torch.no_grad():
        assert_same_combination(in_chunks(x), at_once(x))
        (chunked_logits, chunked_iou), (logits, iou) = in_chunks(x, points=points), at_once(x, points=points)
    assert_same_combination(chunked_logits, logits)
    assert (chunked_iou is None and iou is None) or torch.allclose(chunked_iou, iou, atol=1e-6)


def test_checkpoints_hold_no_sam_weights_and_reload(sam_state_dict):
    network = make_desam(sam_state_dict)
    state = network.state_dict()
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) for k in state)
    assert "sam_fingerprint" in state
    for seed in (1, 2):  # other PRIM/PDMM weights than the saved ones, so that loading has to change them
        torch.manual_seed(seed)
        fresh = DeSAM(sam_state_dict, 1, 3, FULL)
        assert not torch.equal(fresh.state_dict()["decoder.deep_branch.conv1.conv.weight"], state["decoder.deep_branch.conv1.conv.weight"])
        # loading directly, and from a parent module (e.g. torch.compile's wrapper)
        target = fresh if seed == 1 else torch.nn.Sequential(fresh)
        target.load_state_dict(state if seed == 1 else {f"0.{k}": v for k, v in state.items()})
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: f"{s.prompt_mode}-prim{s.use_prim}-iou{s.use_iou_head}-mef{s.fuse_mask_embedding}")
def test_nnunet_pretrained_weights_skip_exactly_the_class_count_dependent_layers(sam_state_dict, settings, tmp_path):
    """nnU-Net's load_pretrained_weights (nnUNetv2_train -pretrained_weights) requires every key to match in
    shape except those containing '.seg_layers.', which it leaves at the new network's initialisation."""
    three_classes = make_desam(sam_state_dict, classes=3, settings=settings)
    torch.manual_seed(1)
    five_classes = DeSAM(sam_state_dict, 1, 5, settings)
    saved, initial = three_classes.state_dict(), five_classes.state_dict()
    assert saved.keys() == initial.keys()
    assert {k for k in saved if saved[k].shape != initial[k].shape} == {k for k in saved if ".seg_layers." in k}
    assert {k for k in saved if ".seg_layers." in k} >= {"decoder.seg_layers.0.weight", "decoder.seg_layers.1.weight"}
    assert ("prim.iou_prediction_head.seg_layers.0.weight" in saved) == settings.use_iou_head
    torch.save({"network_weights": saved}, tmp_path / "checkpoint_final.pth")
    load_pretrained_weights(five_classes, str(tmp_path / "checkpoint_final.pth"))
    loaded = five_classes.state_dict()
    for key in saved:
        assert torch.equal(loaded[key], initial[key] if ".seg_layers." in key else saved[key]), key


def test_weights_trained_on_another_sam_are_refused(sam_state_dict, other_tiny_sam_checkpoint):
    state = make_desam(sam_state_dict).state_dict()
    other = DeSAM.from_sam_checkpoint(other_tiny_sam_checkpoint, 1, 3)
    with pytest.raises(SAMCheckpointError, match="trained with SAM weights of fingerprint"):
        other.load_state_dict(state)


def test_incomplete_trained_weights_are_still_refused(sam_state_dict):
    network = make_desam(sam_state_dict)
    state = network.state_dict()
    del state["decoder.seg_layers.0.weight"]
    with pytest.raises(RuntimeError, match="decoder.seg_layers.0.weight"):
        network.load_state_dict(state)


@pytest.mark.parametrize("fuse_mask_embedding", [True, False], ids=["mef", "no-mef"])
def test_pdmm_decodes_image_features_once_for_all_prompts_like_per_prompt_decoding(fuse_mask_embedding):
    torch.manual_seed(0)
    pdmm = PDMM(tap_channels=(24,) * 3, tap_grids=(8,) * 3, width=32, num_classes=3, fuse_mask_embedding=fuse_mask_embedding).eval()
    pdmm.deep_supervision = True
    taps = [torch.randn(2, 24, 6, 6) for _ in range(3)]
    mask_embedding = torch.randn(2 * 4, 32, 6, 6) if fuse_mask_embedding else None
    with torch.no_grad():
        shared = pdmm.decode(pdmm.encode_taps(taps), mask_embedding, prompts_per_image=4)
        per_prompt = pdmm([t.repeat_interleave(4, dim=0) for t in taps], mask_embedding)
    for fast, slow in zip(shared, per_prompt):
        assert fast.shape == slow.shape
        assert (fast - slow).abs().max() < 1e-5
