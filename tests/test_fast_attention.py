"""FusedRelPosAttention against segment_anything's own Attention, which stays the oracle.

All encoders get random relative-position tables and positional embeddings: both are zero-initialised
by default, which would make a wrong bias invisible.
"""

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

from nnunetv2_desam.networks.fast_attention import FusedRelPosAttention, fuse_encoder_attention

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 1e-2

# (img_size, window_size, global_attn_indexes, num_heads); patch 16 gives a 8×8 or 6×6 token grid,
# window 4 divides 8 but not 6 (windows are then padded to 8×8).
CONFIGS = {
    "window_divides_grid": (128, 4, (1, 3), 4),
    "window_padded": (96, 4, (2,), 3),
}


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, the elementwise criterion used for fp32."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def norm_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, the criterion used for bf16 (elementwise is rounding noise)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def randomise_positional_parameters(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def make_encoder(config: str, seed: int = 0) -> ImageEncoderViT:
    img_size, window_size, global_attn_indexes, num_heads = CONFIGS[config]
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=48,
        depth=4,
        num_heads=num_heads,
        mlp_ratio=2.0,
        out_chans=32,
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    )
    randomise_positional_parameters(encoder, seed)
    return encoder.eval()


def fused_copy(encoder: ImageEncoderViT, pad_value: bool = True) -> ImageEncoderViT:
    return fuse_encoder_attention(copy.deepcopy(encoder), pad_value=pad_value)


def make_images(encoder: ImageEncoderViT, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, encoder.img_size, encoder.img_size, generator=generator)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_attention_is_replaced(config):
    fused = fused_copy(make_encoder(config))
    assert all(isinstance(block.attn, FusedRelPosAttention) for block in fused.blocks)


@pytest.mark.parametrize("config", CONFIGS)
def test_blocks_match_reference_fp32(config):
    reference = make_encoder(config)
    fused = fused_copy(reference)
    with torch.no_grad():
        tokens = reference.patch_embed(make_images(reference, batch=2)) + reference.pos_embed
        for reference_block, fused_block in zip(reference.blocks, fused.blocks):
            expected = reference_block(tokens)
            assert max_relative_error(fused_block(tokens), expected) <= FP32_TOLERANCE
            tokens = expected


@pytest.mark.parametrize("pad_value", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("config", CONFIGS)
def test_encoder_matches_reference_fp32(config, batch, pad_value):
    reference = make_encoder(config)
    fused = fused_copy(reference, pad_value=pad_value)
    images = make_images(reference, batch)
    with torch.no_grad():
        assert max_relative_error(fused(images), reference(images)) <= FP32_TOLERANCE


@pytest.mark.parametrize("config", CONFIGS)
def test_encoder_matches_reference_bf16_autocast(config):
    reference = make_encoder(config)
    fused = fused_copy(reference)
    images = make_images(reference, batch=3)
    with torch.no_grad():
        exact = reference(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference_bf16 = reference(images)
            fused_bf16 = fused(images)
    assert norm_relative_error(fused_bf16, reference_bf16) <= BF16_TOLERANCE
    # The fused kernel accumulates logits and bias in fp32, so it must not drift further from the
    # fp32 result than the reference's own bf16 rounding does.
    assert norm_relative_error(fused_bf16, exact) <= 1.25 * norm_relative_error(reference_bf16, exact)


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_match_reference(config):
    reference = make_encoder(config)
    fused = fused_copy(reference)
    images = make_images(reference, batch=2)
    output_weights = torch.randn(reference(images).shape, generator=torch.Generator().manual_seed(2))
    gradients = []
    for encoder in (reference, fused):
        inputs = images.clone().requires_grad_(True)
        (encoder(inputs) * output_weights).sum().backward()
        rel_pos_gradients = [parameter.grad for name, parameter in encoder.named_parameters() if "rel_pos" in name]
        gradients.append([inputs.grad, *rel_pos_gradients])
    for fused_gradient, reference_gradient in zip(gradients[1], gradients[0]):
        assert max_relative_error(fused_gradient, reference_gradient) <= FP32_TOLERANCE


def test_relative_position_tables_are_resampled_like_reference():
    torch.manual_seed(0)
    reference = Attention(32, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    randomise_positional_parameters(reference, seed=0)
    fused = FusedRelPosAttention.from_attention(reference)
    tokens = torch.randn(2, 6, 5, 32)  # 6×5 grid, tables sized for 4×4: both axes are interpolated
    with torch.no_grad():
        assert max_relative_error(fused(tokens), reference(tokens)) <= FP32_TOLERANCE


def test_attention_without_relative_positions_matches_reference():
    torch.manual_seed(0)
    reference = Attention(32, num_heads=4, use_rel_pos=False)
    fused = FusedRelPosAttention.from_attention(reference)
    tokens = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        assert max_relative_error(fused(tokens), reference(tokens)) <= FP32_TOLERANCE


def test_standalone_module_loads_the_reference_state_dict_and_then_computes_the_same():
    torch.manual_seed(0)
    reference = Attention(32, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    torch.nn.init.normal_(reference.rel_pos_h), torch.nn.init.normal_(reference.rel_pos_w)  # zeros would hide a wrong bias
    fused = FusedRelPosAttention(32, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    reference_state = reference.state_dict()
    assert list(fused.state_dict()) == list(reference_state)
    fused.load_state_dict(reference_state)
    tokens = torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        assert max_relative_error(fused(tokens), reference(tokens)) <= FP32_TOLERANCE


def test_fusing_keeps_state_dict_keys_and_shares_parameters():
    encoder = make_encoder("window_divides_grid")
    keys_before = list(encoder.state_dict())
    pointers_before = {name: parameter.data_ptr() for name, parameter in encoder.named_parameters()}
    fuse_encoder_attention(encoder)
    assert list(encoder.state_dict()) == keys_before
    assert {name: parameter.data_ptr() for name, parameter in encoder.named_parameters()} == pointers_before


def test_fusing_is_idempotent():
    encoder = fuse_encoder_attention(make_encoder("window_padded"))
    attentions = [block.attn for block in encoder.blocks]
    fuse_encoder_attention(encoder)
    assert all(block.attn is attention for block, attention in zip(encoder.blocks, attentions))


def test_checkpoint_loaded_after_fusing_reaches_fused_blocks():
    fused = fuse_encoder_attention(make_encoder("window_padded", seed=0))
    checkpoint_source = make_encoder("window_padded", seed=1)
    fused.load_state_dict(checkpoint_source.state_dict())
    images = make_images(fused, batch=2)
    with torch.no_grad():
        assert max_relative_error(fused(images), checkpoint_source(images)) <= FP32_TOLERANCE
