"""Self-attention that stays fast under CPU autocast: ``nn.MultiheadAttention`` with its input projection on
contiguous rows.

Under autocast, ``nn.MultiheadAttention`` leaves its fused inference path (``_native_multi_head_attention``) for
the generic one, which turns a ``batch_first`` input into a transposed (L, N, E) view and projects it with
``F.linear``; on a non-contiguous 3-D input ``linear`` becomes a batched matmul against the weight expanded L
times, and that expanded copy is materialised: for open_clip's ViT-B-32 (L = 50 tokens, E = 768) 88 M entries per
block, 1.0 s of a 2.1 s forward pass of 32 photos in bfloat16 on this project's CPU (torch 2.14, measured
2026-12-05), which made bfloat16 slower than float32 (1.69 s). :class:`PackedSelfAttention` projects the
(N, L, E) rows as they are (one matmul), splits the heads and calls ``F.scaled_dot_product_attention``, the same
arithmetic: 0.88 s in bfloat16, embeddings within cosine 0.99994 of float32 as before. Without autocast (float32)
it is ``nn.MultiheadAttention`` itself, bit for bit: the fused path is already fast there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedSelfAttention", "pack_self_attention"]


class PackedSelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention under autocast projects contiguous rows (module docstring);
    every other call (no autocast, cross-attention, masks, attention weights) is the parent's."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (torch.is_autocast_enabled(query.device.type) and query is key and key is value and not need_weights
                and key_padding_mask is None and attn_mask is None and not is_causal and self._packs(query)):
            return packed_self_attention(self, query), None
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    def _packs(self, x: torch.Tensor) -> bool:
        """The plain configuration the packed path computes: batch-first 3-D input, one packed in-projection,
        no extra key/value bias or zero attention, no dropout."""
        return (self.batch_first and x.dim() == 3 and self._qkv_same_embed_dim and self.in_proj_weight is not None
                and self.bias_k is None and not self.add_zero_attn and (self.dropout == 0.0 or not self.training))


def packed_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``mha(x, x, x, need_weights=False)[0]`` for a batch-first ``x`` of shape (N, L, E), computed with one
    projection of the contiguous rows and ``F.scaled_dot_product_attention``."""
    n, length, embed = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # (N, L, 3E): folded into one 2-D matmul
    q, k, v = qkv.view(n, length, 3, heads, embed // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, L, d)
    out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(n, length, embed), mha.out_proj.weight, mha.out_proj.bias)


def pack_self_attention(model: nn.Module) -> int:
    """Make every ``nn.MultiheadAttention`` in ``model`` a :class:`PackedSelfAttention` in place (same parameters,
    state_dict keys and hooks: only the class changes); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = PackedSelfAttention
            count += 1
    return count
