"""Fused attention for SAM's ViT image encoder: exact decomposed relative-position bias, no N×N matrix.

segment_anything's ``Attention`` builds the full ``(B·heads, N, N)`` logit matrix so that it can add
the decomposed relative-position bias of MViTv2 before the softmax. For a global block of ViT-H at
1024² (N = 64·64 = 4096) that matrix, its biased copy and its softmax dominate runtime and memory.

The bias has rank ``H + W``, so it can be folded into the dot product instead. With ``row(t)`` and
``col(t)`` the grid position of token ``t``,

    bias[q, k] = rel_h[q, row(k)] + rel_w[q, col(k)]
               = <[rel_h[q, :], rel_w[q, :]], [onehot_H(row(k)), onehot_W(col(k))]>,

hence with the augmented vectors

    q' = [q · scale, rel_h[q, :], rel_w[q, :], 0…]        k' = [k, onehot_H(row(k)), onehot_W(col(k)), 0…]

``q'·k' = scale·q·k + bias[q, k]`` are exactly the reference logits and
``scaled_dot_product_attention(q', k', v, scale=1)`` is the reference attention. SDPA then runs a fused
kernel (flash / cuDNN / memory-efficient on CUDA, flash on CPU) that never stores the logits.

Layout choices, all made for the backend selection of PyTorch 2.x SDPA:

* the augmented width ``head_dim + H + W`` is zero-padded to a multiple of 8 (ViT-H: 80 + 64 + 64 =
  208 for global blocks, 80 + 14 + 14 = 108 -> 112 for 14×14 windows). cuDNN and memory-efficient
  attention require it, flash would otherwise pad with an extra copy inside SDPA.
* ``q'``, ``k'``, ``v'`` are built in ``(B, N, heads, D)`` memory order and handed to SDPA as
  ``(B, heads, N, D)`` views, which is the native layout of the flash, cuDNN and cutlass kernels.
* ``pad_value=True`` (default) zero-pads ``v`` to the width of ``q'``/``k'`` and slices the output.
  Flash attention (CUDA and CPU) requires equal q/k/v widths; with unequal widths PyTorch falls back to
  memory-efficient attention on CUDA and to the N×N math kernel on CPU. Padding costs
  ``(D - head_dim) / (D + head_dim)`` extra attention FLOPs, but keeps every fused backend eligible.
  ``pad_value=False`` is the better choice where cuDNN attention takes head dims up to 256 with
  ``d_v != d_qk`` (Hopper with a recent cuDNN): it skips the wasted ``P·0`` products.

Passing the bias as a float ``attn_mask`` instead is exact too and keeps head_dim at 64/80, but it
materialises the ``(B, heads, N, N)`` bias (4.3 GB in bf16 per global block of ViT-H at batch 8) and
rules out flash attention. On CPU (embed 256, 64×64 tokens, batch 1, fp32) the extra peak memory of a
forward pass was 839 MB for the reference, 334 MB with ``attn_mask`` and 116 MB with this module.
There ``attn_mask`` was also the fastest: a CPU is compute-bound, and the fold multiplies the attention
FLOPs by ``(D_qk + D_v) / (2·head_dim)`` (2.6 for ViT-H global blocks with ``pad_value=True``). On a
GPU the reference is bound by memory traffic over the N×N matrices, which the fold removes.
"""

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from torch import nn

# Head-dim granularity required by the cuDNN and memory-efficient SDPA kernels for fp16/bf16.
HEAD_DIM_ALIGNMENT = 8


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def relative_position_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for all query/key index pairs along one axis of length ``size``.

    ``rel_pos`` (L, head_dim) holds one embedding per offset ``-(L-1)/2 .. (L-1)/2``; if
    ``L != 2·size - 1`` it is linearly resampled, as segment_anything's ``get_rel_pos`` does.
    Returns (size, size, head_dim) with ``table[i, j] = rel_pos[i - j + size - 1]``.
    """
    num_offsets = 2 * size - 1
    if rel_pos.shape[0] != num_offsets:
        rel_pos = F.interpolate(rel_pos.T.unsqueeze(0), size=num_offsets, mode="linear").squeeze(0).T
    index = torch.arange(size, device=rel_pos.device)
    return rel_pos[index[:, None] - index[None, :] + size - 1]


def position_keys(height: int, width: int, total_width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Key-side augmentation: (H·W, total_width) with ``onehot_H(row)``, ``onehot_W(col)``, then zeros.

    Token ``t`` of the row-major grid has ``row = t // W`` and ``col = t % W``.
    """
    token = torch.arange(height * width, device=device)
    keys = torch.zeros(height * width, total_width, dtype=dtype, device=device)
    keys[token, token // width] = 1
    keys[token, height + token % width] = 1
    return keys


def _zeros_like_prefix(tensor: torch.Tensor, last_dim: int) -> torch.Tensor:
    """A broadcast (no storage) zero tensor of shape ``tensor.shape[:-1] + (last_dim,)``."""
    return tensor.new_zeros(()).expand(*tensor.shape[:-1], last_dim)


class FusedRelPosAttention(nn.Module):
    """Drop-in for ``segment_anything.modeling.image_encoder.Attention`` running on fused SDPA kernels.

    Same constructor arguments, parameters (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``), state
    dict keys and I/O shapes (B, H, W, C) -> (B, H, W, C) as the reference; see the module docstring
    for how the relative-position bias is folded into the query/key dot product.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
        pad_value: bool = True,
    ) -> None:
        """
        Args:
            dim: number of input channels C.
            num_heads: number of attention heads; head_dim = C // num_heads.
            qkv_bias: learnable bias on the query/key/value projection.
            use_rel_pos: add the decomposed relative-position bias to the logits.
            rel_pos_zero_init: accepted for signature parity; the tables are zero-initialised like
                the reference's, which ignores this flag as well.
            input_size: (H, W) the relative-position tables are sized for; required with use_rel_pos.
            pad_value: zero-pad v to the augmented q/k width so flash attention is eligible.
        """
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.pad_value = pad_value

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size must be given when use_rel_pos is True.")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    @classmethod
    def from_attention(cls, attention: Attention, pad_value: bool = True) -> "FusedRelPosAttention":
        """A fused module sharing ``attention``'s submodules and Parameter objects (no weight copies)."""
        input_size = None
        if attention.use_rel_pos:
            input_size = ((attention.rel_pos_h.shape[0] + 1) // 2, (attention.rel_pos_w.shape[0] + 1) // 2)
        with torch.device("meta"):
            fused = cls(
                dim=attention.qkv.in_features,
                num_heads=attention.num_heads,
                qkv_bias=attention.qkv.bias is not None,
                use_rel_pos=attention.use_rel_pos,
                input_size=input_size,
                pad_value=pad_value,
            )
        fused.qkv = attention.qkv
        fused.proj = attention.proj
        if attention.use_rel_pos:
            fused.rel_pos_h = attention.rel_pos_h
            fused.rel_pos_w = attention.rel_pos_w
        return fused.train(attention.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        # q, k, v: (B, N, heads, head_dim) strided views into the qkv projection, N = H·W.
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).unbind(2)
        head_dim = q.shape[-1]
        scale = self.scale
        if self.use_rel_pos:
            q, k, v = self._fold_relative_bias(q, k, v, height, width)
            scale = 1.0
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        # (B, heads, N, Dv) -> (B, N, heads, head_dim) -> (B, H, W, C)
        out = out.transpose(1, 2)[..., :head_dim].reshape(batch, height, width, channels)
        return self.proj(out)

    def _fold_relative_bias(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, heads, head_dim) q, k, v -> q', k' (B, N, heads, D) with q'·k' = scale·q·k + bias, v'.

        v' is v zero-padded to width D if ``pad_value``, else v itself.
        """
        head_dim = q.shape[-1]
        total_width = _round_up(head_dim + height + width, HEAD_DIM_ALIGNMENT)
        rel_h, rel_w = self._relative_logits(q, height, width)
        q_padding = _zeros_like_prefix(q, total_width - head_dim - height - width)
        q = torch.cat([q * self.scale, rel_h, rel_w, q_padding], dim=-1)
        keys = position_keys(height, width, total_width - head_dim, k.dtype, k.device)
        # keys: (N, D - head_dim), broadcast over batch and heads.
        k = torch.cat([k, keys[None, :, None, :].expand(*k.shape[:-1], -1)], dim=-1)
        if self.pad_value:
            v = torch.cat([v, _zeros_like_prefix(v, total_width - head_dim)], dim=-1)
        return q, k, v

    def _relative_logits(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled q (B, N, heads, head_dim) -> rel_h (B, N, heads, H) and rel_w (B, N, heads, W)."""
        batch, tokens, heads, head_dim = q.shape
        table_h = relative_position_table(height, self.rel_pos_h)  # (H, H, head_dim)
        table_w = relative_position_table(width, self.rel_pos_w)  # (W, W, head_dim)
        q_grid = q.reshape(batch, height, width, heads, head_dim)
        rel_h = torch.einsum("bhwnc,hkc->bhwnk", q_grid, table_h).reshape(batch, tokens, heads, height)
        rel_w = torch.einsum("bhwnc,wkc->bhwnk", q_grid, table_w).reshape(batch, tokens, heads, width)
        return rel_h, rel_w


def fuse_encoder_attention(image_encoder: ImageEncoderViT, pad_value: bool = True) -> ImageEncoderViT:
    """Swap every block's reference ``Attention`` for :class:`FusedRelPosAttention`, in place.

    The fused modules share the reference's Parameter objects, so memory does not grow, the state dict
    keys stay the same and ``load_state_dict`` on the encoder afterwards updates the fused blocks.
    Returns ``image_encoder`` for chaining.
    """
    for block in image_encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = FusedRelPosAttention.from_attention(block.attn, pad_value=pad_value)
    return image_encoder
