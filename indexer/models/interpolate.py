"""Paths between two latent vectors: the straight line (:func:`lerp`) and the great-circle arc (:func:`slerp`).

The one implementation behind the VAE's latent walks (``indexer.models.vae.interpolate``) and the mapper's
paths (``indexer.models.mapper.interpolate``: z_id along the arc, z_attr along the line).
"""

from __future__ import annotations

import torch


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points ``(1 - t) a + t b`` between vectors a and b ``(D,)`` at fractions t ``(T,)`` -> ``(T, D)``."""
    return (1 - t)[:, None] * a + t[:, None] * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors a and b ``(D,)`` at fractions t ``(T,)`` -> ``(T, D)``.

    Follows the great circle between the two directions while blending the norms (unit vectors stay on the unit
    sphere); parallel (or anti-parallel, or zero) vectors have no unique great circle, so those fall back to the
    straight line. Computed in float64, returned in a's dtype.
    """
    a64, b64, t64 = a.double(), b.double(), t.double()[:, None]
    na, nb = a64.norm(), b64.norm()
    if na < 1e-12 or nb < 1e-12:
        return ((1 - t64) * a64 + t64 * b64).to(a.dtype)
    cos = torch.clamp(torch.dot(a64 / na, b64 / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    if so < 1e-6:
        return ((1 - t64) * a64 + t64 * b64).to(a.dtype)
    out = (torch.sin((1 - t64) * omega) / so) * a64 + (torch.sin(t64 * omega) / so) * b64
    return out.to(a.dtype)
