"""Reading official SAM checkpoints and deriving the architecture from their tensors.

The official files (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``)
are plain state dicts of segment_anything's ``Sam``. Everything DeSAM needs to rebuild the
encoder, prompt encoder and PRIM is read off the tensor shapes, timm-style, so one loader serves
ViT-B/L/H and the tiny random checkpoints that the tests and the demo write
(:mod:`nnunetv2_desam.experiments.random_sam_checkpoint`).
"""

import hashlib
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass
from functools import partial
from typing import Dict, Optional, Tuple, Type

import torch
from torch import nn
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from nnunetv2_desam.errors import SAMCheckpointError
from nnunetv2_desam.networks.tinyvit_encoder import TINYVIT_ENCODER_KEYS, TinyViTConfig, build_tinyvit_encoder, encoder_weights

OFFICIAL_CHECKPOINT_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}

# SAM's two-way transformer always has 8 heads (segment_anything/build_sam.py); head count is the
# one quantity a state dict cannot reveal, since it only splits the projections.
TWO_WAY_TRANSFORMER_HEADS = 8

# Image-encoder keys per family (ViT first: a foreign file is reported against the official layout),
# then the prompt encoder and mask decoder keys that every family shares.
_ENCODER_KEYS = {
    "vit": (
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        "image_encoder.blocks.0.attn.rel_pos_h",
        "image_encoder.neck.0.weight",
    ),
    "tinyvit": TINYVIT_ENCODER_KEYS,
}
_SHARED_KEYS = (
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "prompt_encoder.mask_downscaling.0.weight",
    "mask_decoder.iou_token.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
)


@dataclass(frozen=True)
class SAMConfig:
    """Architecture of a SAM model, as read from a state dict.

    ``tinyvit`` is set for TinyViT files (MobileSAM, LiteMedSAM); then the ``encoder_*`` fields
    describe TinyViT's last stage, ``encoder_global_attn_indexes`` is empty (TinyViT attends in
    windows only) and ``patch_size`` is the input size over the 64² embedding grid (4 for LiteMedSAM).
    """

    img_size: int
    patch_size: int
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_mlp_ratio: float
    encoder_window_size: int
    encoder_global_attn_indexes: Tuple[int, ...]
    prompt_embed_dim: int
    mask_in_chans: int
    num_mask_tokens: int
    transformer_depth: int
    transformer_mlp_dim: int
    attention_downsample_rate: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    tinyvit: Optional[TinyViTConfig] = None

    @property
    def family(self) -> str:
        """``"vit"`` (segment_anything's ViT-B/L/H) or ``"tinyvit"`` (MobileSAM, LiteMedSAM)."""
        return "vit" if self.tinyvit is None else "tinyvit"

    @property
    def image_embedding_size(self) -> int:
        """Side of the encoder's token grid (64 for the official 1024 input)."""
        return self.img_size // self.patch_size

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor]) -> "SAMConfig":
        """Derive the architecture from tensor shapes (ViT-B/L/H or any size in that layout)."""
        encoder = _tinyvit_encoder_fields(state_dict) if encoder_family(state_dict) == "tinyvit" else _vit_encoder_fields(state_dict)
        dec = "mask_decoder."
        prompt_dim = state_dict[dec + "iou_token.weight"].shape[1]
        q_dim = state_dict[dec + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
        iou_layers = [k for k in state_dict if k.startswith(dec + "iou_prediction_head.layers.") and k.endswith("weight")]
        return cls(
            **encoder,
            prompt_embed_dim=prompt_dim,
            mask_in_chans=4 * state_dict["prompt_encoder.mask_downscaling.0.weight"].shape[0],
            num_mask_tokens=state_dict[dec + "mask_tokens.weight"].shape[0],
            transformer_depth=1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith(dec + "transformer.layers.")),
            transformer_mlp_dim=state_dict[dec + "transformer.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample_rate=prompt_dim // q_dim,
            iou_head_depth=len(iou_layers),
            iou_head_hidden_dim=state_dict[dec + "iou_prediction_head.layers.0.weight"].shape[0],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SAMConfig":
        """Inverse of :meth:`to_dict`, also after a JSON round trip (lists back to tuples)."""
        tinyvit = values.get("tinyvit")
        return cls(**{
            **values,
            "encoder_global_attn_indexes": tuple(values["encoder_global_attn_indexes"]),
            "tinyvit": None if tinyvit is None else TinyViTConfig.from_dict(tinyvit),
        })


def _vit_encoder_fields(state_dict: Dict[str, torch.Tensor]) -> dict:
    """SAMConfig's image-encoder fields of a segment_anything ViT, from its tensor shapes."""
    enc = "image_encoder."
    embed_dim, _, patch_size, _ = state_dict[enc + "patch_embed.proj.weight"].shape
    grid = state_dict[enc + "pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith(enc + "blocks."))
    rel_pos_lengths = [state_dict[f"{enc}blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    windowed = [n for n in rel_pos_lengths if n != 2 * grid - 1]
    head_dim = state_dict[enc + "blocks.0.attn.rel_pos_h"].shape[1]
    return dict(
        img_size=grid * patch_size,
        patch_size=patch_size,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_mlp_ratio=state_dict[enc + "blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        encoder_window_size=(windowed[0] + 1) // 2 if windowed else 0,
        encoder_global_attn_indexes=tuple(i for i, n in enumerate(rel_pos_lengths) if n == 2 * grid - 1),
    )


def _tinyvit_encoder_fields(state_dict: Dict[str, torch.Tensor]) -> dict:
    """SAMConfig's image-encoder fields of a TinyViT (MobileSAM, LiteMedSAM), from its tensor shapes."""
    tinyvit = TinyViTConfig.from_state_dict(state_dict)
    return dict(
        img_size=tinyvit.img_size,
        patch_size=tinyvit.img_size // tinyvit.embedding_grid,
        encoder_embed_dim=tinyvit.embed_dims[-1],
        encoder_depth=sum(tinyvit.depths),
        encoder_num_heads=tinyvit.num_heads[-1],
        encoder_mlp_ratio=tinyvit.mlp_ratio,
        encoder_window_size=tinyvit.window_sizes[-1],
        encoder_global_attn_indexes=(),
        tinyvit=tinyvit,
    )


def build_image_encoder(config: SAMConfig) -> nn.Module:
    """The checkpoint's image encoder with its geometry (random weights until loaded): segment_anything's
    ViT, or for TinyViT files the libraries' TinyViT (:func:`~nnunetv2_desam.networks.tinyvit_encoder.build_tinyvit_encoder`)."""
    if config.tinyvit is not None:
        return build_tinyvit_encoder(config.tinyvit)
    return ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.encoder_mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=config.encoder_window_size,
        global_attn_indexes=config.encoder_global_attn_indexes,
    )


def build_prompt_encoder(config: SAMConfig) -> PromptEncoder:
    grid = config.image_embedding_size
    return PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )


def build_mask_decoder(config: SAMConfig, decoder_class: Type[MaskDecoder] = MaskDecoder) -> MaskDecoder:
    """SAM's full mask decoder (or a subclass with its constructor); DeSAM keeps its transformer, tokens and IoU head (PRIM)."""
    transformer = TwoWayTransformer(
        depth=config.transformer_depth,
        embedding_dim=config.prompt_embed_dim,
        mlp_dim=config.transformer_mlp_dim,
        num_heads=TWO_WAY_TRANSFORMER_HEADS,
        attention_downsample_rate=config.attention_downsample_rate,
    )
    return decoder_class(
        transformer_dim=config.prompt_embed_dim,
        transformer=transformer,
        num_multimask_outputs=config.num_mask_tokens - 1,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )


def build_sam(config: SAMConfig) -> Sam:
    return Sam(
        image_encoder=build_image_encoder(config),
        prompt_encoder=build_prompt_encoder(config),
        mask_decoder=build_mask_decoder(config),
    )


def encoder_family(state_dict: Dict[str, torch.Tensor]) -> str:
    """``"tinyvit"`` for MobileSAM / LiteMedSAM files (convolutional patch embedding ``patch_embed.seq``), else ``"vit"``.

    A file of neither layout counts as ``"vit"``, so its refusal names the official layout's keys.
    """
    return "tinyvit" if TINYVIT_ENCODER_KEYS[0] in state_dict else "vit"


def _official_hint() -> str:
    return ("expected an official SAM checkpoint (" + ", ".join(OFFICIAL_CHECKPOINT_URLS.values())
            + "), MobileSAM's mobile_sam.pt or LiteMedSAM's lite_medsam.pth")


def load_sam_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Load an official-layout SAM state dict safely (``weights_only``: a file cannot run code).

    The image encoder may be segment_anything's ViT or a TinyViT (MobileSAM, LiteMedSAM):
    :func:`encoder_family` tells which, and only that family's keys are required.

    Raises :class:`SAMCheckpointError` with a one-line message for a missing, truncated,
    corrupted or foreign file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SAMCheckpointError(f"{path} is a directory, not a SAM checkpoint file; {_official_hint()}")
    if not os.path.isfile(path):
        raise SAMCheckpointError(f"SAM checkpoint not found: {path}; {_official_hint()}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SAMCheckpointError(
            f"cannot read SAM checkpoint {path}: the file is truncated, corrupted or not a PyTorch "
            f"weights file ({reason}); {_official_hint()}"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise SAMCheckpointError(f"{path} is not a SAM checkpoint: it holds no state dict of tensors; {_official_hint()}")
    required = _ENCODER_KEYS[encoder_family(state_dict)] + _SHARED_KEYS
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise SAMCheckpointError(
            f"{path} is not a SAM checkpoint: key {missing[0]!r} is missing "
            f"({len(missing)} of {len(required)} expected keys absent); {_official_hint()}"
        )
    return state_dict


def sam_fingerprint(state_dict: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes: identifies the SAM weights used."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-dim too (BatchNorm counters)
    return digest.hexdigest()


def image_encoder_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image encoder's entries without the ``image_encoder.`` prefix (for TinyViT files without
    the ImageNet classifier that MobileSAM's file carries and SAM never runs)."""
    if encoder_family(state_dict) == "tinyvit":
        return encoder_weights(state_dict)
    return sub_state_dict(state_dict, "image_encoder.")


def sub_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Entries under ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
