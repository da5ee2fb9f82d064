"""The Table 2 augmentations' defining properties, on small CPU inputs (2d and 3d)."""

import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunetv2_desam.augmentation.adversarial_bias import (
    BiasFieldSettings, apply_bias_field, bias_divergence, bias_field, optimise_control_points, random_control_points,
)
from nnunetv2_desam.augmentation.causal_intervention import (
    CSDGSettings, blending_mask, gin_ipa_views, global_intensity_nonlinear, kl_from_mean_consistency, random_shallow_network,
)
from nnunetv2_desam.augmentation.consistency import MultiViewLoss
from nnunetv2_desam.augmentation.control_points import ControlPointGrid, interpolate_control_points
from nnunetv2_desam.augmentation.maxstyle import MaxStyleSettings, StyleComposition, channel_statistics, search_styles, stylised_images, style_layers
from nnunetv2_desam.augmentation.random_convolution import js_consistency, random_convolution
from nnunetv2_desam.networks.image_decoder import ImageDecoder

SIZES = {2: (64, 64), 3: (32, 32, 32)}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def smooth_images(batch, size, seed=0):
    """Blobby test images B×1×size: low-resolution noise, upsampled."""
    g = generator(seed)
    coarse = torch.randn(batch, 1, *[max(2, s // 8) for s in size], generator=g)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(coarse, size=size, mode=mode, align_corners=False)


def roughness(field: torch.Tensor) -> float:
    """Largest mean absolute second difference along an axis, relative to each field's range (B×1×spatial fields):
    a smooth field is locally nearly linear; a rough one is not."""
    span = (field.flatten(1).amax(1) - field.flatten(1).amin(1)).view(-1, *[1] * (field.ndim - 1))
    curvature = [torch.diff(field / span, n=2, dim=axis).abs().mean().item() for axis in range(2, field.ndim) if field.shape[axis] > 2]
    return max(curvature)


def tiny_unet(dims, classes=3):
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dims == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    strides = [1, 2, 2]
    network = PlainConvUNet(1, 3, [8, 16, 32], conv, 3, strides, 2, classes, 2, True, norm, {"eps": 1e-5, "affine": True},
                            nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    torch.manual_seed(3)
    network.apply(network.initialize)
    return network


# ---------------------------------------------------------------- control-point fields (AdvBias, IPA)

@pytest.mark.parametrize("dims", [2, 3])
def test_constant_control_points_give_a_constant_field(dims):
    """The B-spline is complete over the patch: its shifted kernels sum to one everywhere."""
    grid = ControlPointGrid.fraction_of_patch(SIZES[dims], 0.5, order=3, downscale=2)
    field = interpolate_control_points(torch.full(grid.points_shape(2), 0.7), grid)
    assert field.shape == (2, 1, *SIZES[dims])
    assert torch.allclose(field, torch.full_like(field, 0.7), atol=1e-6)


# ---------------------------------------------------------------- AdvBias

@pytest.mark.parametrize("dims", [2, 3])
def test_bias_field_is_smooth_and_within_its_bound(dims):
    settings = BiasFieldSettings()
    grid = settings.grid(SIZES[dims])
    field = bias_field(random_control_points(4, grid, settings, "cpu", generator(dims)), grid, settings)
    assert field.min() >= 1 - settings.magnitude - 1e-6 and field.max() <= 1 + settings.magnitude + 1e-6
    assert (field.flatten(1).amax(1) - field.flatten(1).amin(1)).min() > 0.05  # it does vary
    # control points half a patch apart: locally almost linear, unlike a rough field in the same bound
    rough = 1 + settings.magnitude * (2 * torch.rand(field.shape, generator=generator()) - 1)
    assert roughness(field) < 0.01 and roughness(rough) > 0.3


def test_bias_field_multiplies_intensities_above_each_samples_minimum():
    data = torch.randn(3, 2, 32, 32, generator=generator())
    field = 1 + 0.3 * torch.rand(3, 1, 32, 32, generator=generator(1))
    biased = apply_bias_field(data, field)
    low = data.flatten(2).amin(-1)[..., None, None]
    assert torch.allclose(biased - low, field * (data - low), atol=1e-5)
    assert torch.allclose(biased.flatten(2).amin(-1), data.flatten(2).amin(-1))


@pytest.mark.parametrize("dims", [2, 3])
def test_adversarial_step_raises_the_divergence_over_the_initial_and_a_random_step(dims):
    settings = BiasFieldSettings()
    network = tiny_unet(dims)
    data = smooth_images(2, SIZES[dims], seed=dims)
    grid = settings.grid(SIZES[dims])
    low, high = settings.log_bounds
    with torch.no_grad():
        clean = network(data)[0]

    def divergence(points):
        with torch.no_grad():
            return bias_divergence(clean, network(apply_bias_field(data, bias_field(points, grid, settings)))[0], settings.contour_weight)

    for seed in range(4):
        initial = random_control_points(2, grid, settings, "cpu", generator(seed))
        optimised = optimise_control_points(network, data, initial, grid, settings)
        assert optimised.min() >= low - 1e-6 and optimised.max() <= high + 1e-6
        direction = torch.randn(initial.shape, generator=generator(100 + seed))
        random_step = (initial + direction / direction.flatten(1).norm(dim=1).view(-1, *[1] * (dims + 1))).clamp(low, high)
        assert divergence(optimised) > max(divergence(initial), divergence(random_step)), seed
    assert all(p.grad is None for p in network.parameters())  # only the control points were differentiated


# ---------------------------------------------------------------- RandConv

def patches(data: torch.Tensor, size: int) -> torch.Tensor:
    """Every voxel's zero-padded size^d neighbourhood over all channels: (B·voxels)×(C·size^d)."""
    dims = data.ndim - 2
    x = F.pad(data, [size // 2] * (2 * dims))
    for axis in range(dims):
        x = x.unfold(2 + axis, size, 1)
    # B×C×spatial×window -> (B·spatial)×(C·window)
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    return x.reshape(-1, data.shape[1] * size ** dims)


def recover_kernel(data: torch.Tensor, output: torch.Tensor, size: int = 7):
    """The single C×C×size^d kernel that best maps ``data`` to ``output`` by convolution (least squares over the batch),
    and the relative residual of that fit."""
    inputs = patches(data.double(), size)
    targets = output.double().movedim(1, -1).reshape(-1, output.shape[1])
    solution = torch.linalg.lstsq(inputs, targets).solution
    residual = (inputs @ solution - targets).norm() / targets.norm()
    return solution.T.reshape(output.shape[1], data.shape[1], *[size] * (data.ndim - 2)), float(residual)


@pytest.mark.parametrize("dims", [2, 3])
def test_randconv_output_is_one_convolution_of_the_batch_and_the_kernel_changes_between_batches(dims):
    size = (12, 12) if dims == 2 else (6, 10, 10)
    data = torch.randn(2, 2, *size, generator=generator())
    g = generator(5)
    recovered = []
    for _ in range(2):
        output, kernel, alpha = random_convolution(data, generator=g)
        fit, residual = recover_kernel(data, output)
        assert residual < 1e-6  # the whole batch's output is one convolution of the input (with zero padding)
        # the recovered kernel is α·K + (1−α)·identity, K of an odd size from {1, 3, 5, 7}, embedded in 7^d
        identity = torch.zeros_like(fit)
        identity[(range(2), range(2), *[3] * dims)] = 1
        offset = (7 - kernel.shape[-1]) // 2
        embedded = torch.zeros_like(fit)
        embedded[(slice(None), slice(None), *[slice(offset, offset + kernel.shape[-1])] * dims)] = kernel.double()
        assert torch.allclose(fit, alpha * embedded + (1 - alpha) * identity, atol=1e-6)
        recovered.append(fit)
    assert (recovered[0] - recovered[1]).abs().max() > 0.1


def test_randconv_kernels_follow_kaiming_normal_and_all_sizes_occur():
    data = torch.zeros(1, 2, 16, 16)
    g = generator(1)
    kernels = [random_convolution(data, generator=g)[1] for _ in range(200)]
    assert {k.shape[-1] for k in kernels} == {1, 3, 5, 7}
    sevens = torch.cat([k.flatten() for k in kernels if k.shape[-1] == 7])
    assert abs(sevens.std().item() - 1 / math.sqrt(2 * 49)) < 0.01


def test_consistency_losses_vanish_for_identical_views_only():
    logits = torch.randn(2, 3, 8, 8, generator=generator())
    other = torch.randn(2, 3, 8, 8, generator=generator(1))
    for consistency in (js_consistency, kl_from_mean_consistency):
        assert consistency([logits, logits, logits]).abs() < 1e-6
        assert consistency([logits, other, logits]) > 1e-3


# ---------------------------------------------------------------- CSDG

def piecewise_constant_image(dims):
    """A label map (three nested regions, cylinders in 3d) and an image with one intensity per region."""
    size = (64, 64) if dims == 2 else (12, 64, 64)
    coordinates = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    radius = torch.stack([c ** 2 for c in coordinates[-2:]]).sum(0).sqrt()
    labels = (radius < 0.7).long() + (radius < 0.3).long()
    image = torch.tensor([-1.0, 0.5, 2.0])[labels]
    return labels, image.expand(4, 1, *size).clone()


@pytest.mark.parametrize("dims", [2, 3])
def test_gin_changes_intensity_non_linearly(dims):
    data = smooth_images(16, SIZES[dims])
    output = random_shallow_network(data, CSDGSettings(kernel_sizes=(1,)), generator(dims))  # voxel-wise: a function of intensity
    design = torch.stack([data.flatten(1), torch.ones_like(data.flatten(1))], -1)
    residuals = []
    for x, y in zip(design, output.flatten(1)):
        fit = torch.linalg.lstsq(x.double(), y.double()[:, None]).solution
        residuals.append(float((x.double() @ fit - y.double()[:, None]).norm() / (y.double() - y.double().mean()).norm()))
    assert sorted(residuals)[len(residuals) // 4] > 0.05, residuals  # three quarters of the random maps are far from affine
    mixed = global_intensity_nonlinear(data, generator=generator())
    assert torch.allclose(mixed.flatten(1).norm(dim=1), data.flatten(1).norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_gin_keeps_label_geometry(dims):
    """Within each region farther than GIN's receptive field (4 layers of at most 3-voxel kernels) from a boundary
    or the border, the output is constant: intensities change, structure does not move."""
    labels, image = piecewise_constant_image(dims)
    output = global_intensity_nonlinear(image, generator=generator(dims))
    reach = CSDGSettings().layers
    pool = F.max_pool2d if dims == 2 else F.max_pool3d
    one_hot = F.one_hot(labels, 3).movedim(-1, 0)[None].float()
    mixed_neighbourhood = pool(one_hot, 2 * reach + 1, 1, reach).sum(1)[0] > 1
    border = torch.ones_like(labels, dtype=torch.bool)
    border[(slice(reach, -reach),) * dims] = False
    interior = ~mixed_neighbourhood & ~border
    for region in range(3):
        values = output[:, 0][:, interior & (labels == region)]
        assert values.numel() > 0 and (values.amax(1) - values.amin(1)).max() < 1e-4


@pytest.mark.parametrize("dims", [2, 3])
def test_ipa_mask_is_smooth_and_spans_zero_to_one(dims):
    mask = blending_mask(4, SIZES[dims], generator=generator(dims))
    assert mask.shape == (4, 1, *SIZES[dims])
    assert torch.allclose(mask.flatten(1).amin(1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(mask.flatten(1).amax(1), torch.ones(4), atol=1e-6)
    assert roughness(mask) < 0.02  # control points a quarter patch apart


def test_gin_ipa_views_blend_two_gin_copies_complementarily():
    data = smooth_images(3, SIZES[2])
    views = gin_ipa_views(data, generator=generator())
    assert views.shape == (9, 1, *SIZES[2])
    g = generator()
    first, second, third = (global_intensity_nonlinear(data, generator=g) for _ in range(3))
    mask = blending_mask(3, SIZES[2], generator=g)
    assert torch.allclose(views[:3], first * mask + second * (1 - mask), atol=1e-5)
    assert torch.allclose(views[:3] + views[3:6], first + second, atol=1e-5)
    assert torch.allclose(views[6:], third, atol=1e-5)


# ---------------------------------------------------------------- MaxStyle

@pytest.mark.parametrize("dims", [2, 3])
def test_maxstyle_layer_sets_mixed_and_bounded_noisy_statistics(dims):
    features = smooth_images(4, SIZES[dims]).repeat(1, 3, *[1] * dims) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, *[1] * dims)
    features = features + torch.randn(4, 3, *[1] * dims, generator=generator(1))  # a style per sample and channel
    layer = StyleComposition(4, 3, MaxStyleSettings(probability=1.0), "cpu", generator(dims))
    assert layer.active and not torch.equal(layer.permutation, torch.arange(4))
    output = layer(features)
    mean, std = channel_statistics(features, layer.eps)
    new_mean, new_std = channel_statistics(output, 0.0)
    target_mean, target_std = layer.target_statistics(mean, std)
    assert torch.allclose(new_mean, target_mean, atol=1e-4) and torch.allclose(new_std, target_std, rtol=1e-3)
    # mixed statistics lie between each sample's own and its partner's; the noise is bounded in units of the batch's style spread
    shape = (4, 3, *[1] * dims)
    mixing = layer.mixing.clamp(0, 1).view(4, 1, *[1] * dims)
    mixed_mean = (1 - mixing) * mean + mixing * mean[layer.permutation]
    assert (mixed_mean >= torch.minimum(mean, mean[layer.permutation]) - 1e-6).all()
    assert (mixed_mean <= torch.maximum(mean, mean[layer.permutation]) + 1e-6).all()
    noise = (new_mean - mixed_mean).abs()
    assert (noise <= layer.beta_noise.detach().abs().view(shape) * mean.std(0, keepdim=True) + 1e-4).all()


def test_inactive_maxstyle_layer_is_the_identity_without_parameters():
    layer = StyleComposition(4, 3, MaxStyleSettings(probability=0.0), "cpu", generator())
    features = torch.randn(4, 3, 8, 8)
    assert not list(layer.parameters()) and torch.equal(layer(features), features)


@pytest.mark.parametrize("dims", [2, 3])
def test_maxstyle_search_raises_the_segmentation_loss_over_the_initial_styles(dims):
    network = tiny_unet(dims)
    decoder = ImageDecoder(network.encoder, 1, [1, 1])
    data = smooth_images(4, SIZES[dims], seed=2)
    labels = (data > 0).long()
    with torch.no_grad():
        bottleneck = network.encoder(data)[-1]

    def loss(images):
        return F.cross_entropy(network(images)[0], labels[:, 0])

    settings = MaxStyleSettings(probability=1.0)
    initial = style_layers(decoder, 4, settings, "cpu", generator(7))
    searched = search_styles(decoder, bottleneck, loss, data, settings, generator=generator(7))
    with torch.no_grad():
        before, after = (loss(stylised_images(decoder, bottleneck, styles, data)) for styles in (initial, searched))
    assert after > before
    assert all(p.grad is None for p in [*network.parameters(), *decoder.parameters()])
    assert sorted(searched) == [0, 1, 2]  # the last two decoder stages and the output image


# ---------------------------------------------------------------- consistency with nnU-Net's loss

def test_multi_view_loss_is_the_segmentation_loss_on_one_view_plus_weighted_consistency():
    segmentation = torch.nn.CrossEntropyLoss()
    loss = MultiViewLoss(lambda output, target: segmentation(output, target), js_consistency, weight=10.0)
    target = torch.randint(0, 3, (2, 8, 8), generator=generator())
    views = torch.randn(6, 3, 8, 8, generator=generator(1))
    assert torch.allclose(loss(views[:2], target), segmentation(views[:2], target))  # validation: one view
    expected = segmentation(views[:2], target) + 10.0 * js_consistency(views.chunk(3))
    assert torch.allclose(loss(views, target), expected)
