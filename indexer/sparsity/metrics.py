"""Sparsity metrics of one layer's activations, per image (exact, float64).

Four metrics per image of one layer's activations; :mod:`indexer.sparsity.recorder` computes them for every
recorded layer while a model runs.

Metrics
-------
The activations of one layer for one image are flattened to a vector ``a`` of ``n`` entries; ``|a|`` is taken
element-wise, ``||a||_1 = sum_i |a_i|`` and ``||a||_2 = sqrt(sum_i a_i^2)``.

``near_zero_fraction``
    ``#{i : |a_i| <= t * s} / n`` with ``t`` the relative ``threshold`` (default :data:`DEFAULT_THRESHOLD`) and
    ``s = max_i |a_i|`` the layer's scale for that image.  The scale is the *max*, not the RMS: exact zeros
    (ReLU, ReLU6) count as near-zero under either, but the RMS of a k-sparse vector shrinks like ``sqrt(k/n)``,
    so an RMS threshold drifts down exactly as the layer gets sparser and the metric loses sensitivity where it
    matters; ``t * max`` reads as "below t of this image's peak response in this layer", is scale-invariant,
    and for ``t < 1`` never counts the peak itself, so an image with any signal is never 100% near-zero.
    (The cost: one outlier raises ``s``; ReLU6 caps it at 6 in the default encoder, and Hoyer/Gini below do not
    depend on a threshold at all.)  All-zero activations: ``s = 0`` and the fraction is 1.0.
``hoyer`` (Hoyer 2004, "Non-negative matrix factorization with sparseness constraints")
    ``(sqrt(n) - ||a||_1 / ||a||_2) / (sqrt(n) - 1)`` in ``[0, 1]``: 1 for exactly one non-zero entry, 0 when all
    magnitudes are equal.  All-zero: 1.0 (as for Gini, below).  ``n == 1``: the denominator is 0; we define 0.0
    (a lone unit has nothing to be sparse relative to; this matches Gini, whose formula gives 0 at ``n == 1``).
``gini`` (Hurley & Rickard 2009, "Comparing measures of sparsity")
    sort ``|a|`` ascending as ``c_1 <= ... <= c_n``;
    ``G = 1 - 2 * sum_k (c_k / ||c||_1) * ((n - k + 1/2) / n)``, in ``[0, 1 - 1/n]`` for a non-zero ``a``:
    ``1 - 1/n`` for one non-zero entry, 0 for all-equal magnitudes.  All-zero: ``||c||_1 = 0`` makes it 0/0; we
    define 1.0 because a layer with no active unit is the sparse end of the scale (it agrees with
    ``near_zero_fraction = 1``), and a defined value keeps per-layer means free of NaN.  The formula is
    evaluated in the equivalent form ``G = sum_k (2k - n - 1) * c_k / (n * ||c||_1)`` (expand
    ``1 = sum_k c_k / ||c||_1``).
``l1_l2_ratio``
    ``||a||_1 / ||a||_2`` in ``[1, sqrt(n)]``, lower = sparser (1 for one non-zero entry, ``sqrt(n)`` for
    all-equal magnitudes).  All-zero: 0.0.

An image whose activations hold a NaN or an infinity in a layer gets NaN for every metric of that layer:
a number computed from them would be meaningless.  Hoyer and Gini are clipped to ``[0, 1]`` to drop float
rounding (around 1e-16) at the ends of their ranges; nothing else is clipped.

Computation: exact (no sub-sampling), in float64, on the activations' device.  The cost is the sort Gini needs,
done once per image and reused for every metric (max, the near-zero count by binary search, the L1 and L2
sums).  The sort runs in the activations' own dtype: float32 -> float64 is exact and monotone, so the order is
the same, at half the memory traffic; only the sorted values are widened.  On CPU the sort is NumPy's (SIMD
sorts, several times faster than ``torch.sort`` here, and without the int64 index tensor ``torch.sort``
allocates), one image per task, images spread over ``torch.get_num_threads()`` threads (NumPy releases the GIL
while sorting; each image's numbers do not depend on the thread count); elsewhere (CUDA) it is one batched
``torch.sort`` along dim 1 over chunks of images.  Only the ``(B,)`` results leave the device.

Sampled metrics (the indexing default)
--------------------------------------
:func:`sampled_sparsity_metrics` estimates the same four numbers from ``units`` (default
:data:`DEFAULT_SAMPLE_UNITS`) entries of each image's layer, so that the cost no longer grows with the layer
(EfficientNet-Lite0's 33 layers hold 3.4 M activations per 224 px image: the exact sort costs about twice the
forward pass itself).  The entries are a stratified sample (:class:`BatchSample`: spread evenly over the pixels
and cycling through the channels, every entry of the layer equally likely to be read) seeded by the image's id,
so an image gets the same numbers in every run, batch and memory layout, and it differs from image to image, so
the errors average out over a group of images instead of biasing a layer.  A hook only reads the sampled entries
and the peak (:func:`take_sample`); the arithmetic runs once per batch for all layers (:func:`finish_samples`).

- the peak ``s = max |a|`` is exact (a full-layer max, and min unless the layer is a ReLU: no sort; in a ReLU6
  layer an image whose sample reaches 6 has its peak without it), so ``near_zero_fraction`` is an unbiased
  estimate of the exact fraction (one consequence: a NaN that the sample misses in such a layer goes unseen;
  a decoded photo gives none);
- ``near_zero_fraction`` is that of the sample; ``gini`` is estimated from the sample's even half
  (:func:`gini_units`: 1,536 of 3,072) dealt into 3 blocks of 512, each sorted on its own: the mean of
  ``|a_i - a_j|`` over the pairs within the blocks estimates the layer's (:func:`_gini_from_blocks`), because
  Gini alone needs its entries sorted, and NumPy sorts rows of up to 512 entries several times faster per entry
  than longer ones (:data:`GINI_BLOCK`);
- ``l1_l2_ratio`` is the sample's ratio times ``sqrt(n / units)`` (L1 scales with the count, L2 with its root),
  and ``hoyer`` is computed from that estimate with the layer's true ``n``.

Error (a fraction estimated from ``units`` independent draws has standard error at most ``0.5 / sqrt(units)``,
0.009 at 3,072; the stratified design does better, see :class:`BatchSample`): measured against the exact metrics
(every image, all 33 layers of EfficientNet-Lite0), see ``tests/test_sparsity.py`` for the asserted bounds: per
image and layer, at most 0.04 for ``near_zero_fraction``, ``hoyer`` and ``gini`` and 15% relative for
``l1_l2_ratio``; a layer's mean over 64 images within 0.005 (1% relative for ``l1_l2_ratio``).  Measured on 192
pets photos (2026-12-05): at most 0.024, 0.022 and 0.024 per image and layer (RMS 0.0058, 0.0047, 0.0057) and
8.5% for the L1/L2 ratio (RMS 1.1%); layer means over 64 photos within 0.0023 and 0.54%.  Layers with at most
``units`` entries are computed exactly.  Rows that stores hold from before 2026-12-05 were sampled at 4,096
independent uniform positions (Gini from one sort of 2,048 of them: at most 0.027 off), and rows written earlier
on 2026-12-05 took Gini from one sort of the whole even half (at most 0.023 off, RMS 0.0057): the same
quantities within the same bounds; the manifest's sparsity entry records ``sample_design`` and, since the
blocks, ``gini_estimator``.

:data:`DEFAULT_THRESHOLD` is ``indexer.defaults.SPARSITY_THRESHOLD``.
"""


from __future__ import annotations

import functools
import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from indexer import defaults

__all__ = ["DEFAULT_SAMPLE_UNITS", "DEFAULT_THRESHOLD", "GINI_BLOCK", "GINI_ESTIMATOR", "METRICS", "SAMPLE_DESIGN",
           "BatchSample", "LayerSample",
           "finish_samples", "gini_units", "image_seeds", "sampled_sparsity_metrics", "sparsity_metrics",
           "take_sample"]

METRICS: tuple[str, ...] = ("near_zero_fraction", "hoyer", "gini", "l1_l2_ratio")

DEFAULT_THRESHOLD: float = defaults.SPARSITY_THRESHOLD  # see indexer/defaults.py
DEFAULT_SAMPLE_UNITS: int = defaults.SPARSITY_SAMPLE_UNITS
# Gini sorts its entries in blocks of at most this many. NumPy sorts a float32 row of up to 512 entries in SIMD
# sorting networks (AVX-512 here: 1.1-1.3 ns per entry), a longer one by quicksort at 4.4-7.4 ns (measured
# 2026-12-05 over 1.6 M entries in rows of 128 to 4,096), so 1,536 entries sort 4.5x faster as 3 rows of 512.
GINI_BLOCK = 512
# What a store's manifest records of how its sampled rows were drawn (BatchSample's design) and of how Gini is
# estimated from them (_gini_from_blocks).
SAMPLE_DESIGN = "stratified-pixels-channels"
GINI_ESTIMATOR = f"pairs-within-blocks-of-{GINI_BLOCK}"

# Rows of images sorted together on non-CPU devices: bounds the float64 copy to 512 MiB.
_DEVICE_CHUNK_ELEMENTS = 1 << 26


# ------------------------------------------------------------------------------------------------- metrics


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (a fraction of the layer's max |a|), got {threshold}")
    return threshold


def _gini_weights(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``2k - n - 1`` for k = 1..n, in float64 (exact: integers below 2**53)."""
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return 2.0 * k - (n + 1)


def _row_sums(row: np.ndarray, weights: np.ndarray, threshold: float) -> tuple[float, float, float, float] | None:
    """(L1, sum of squares, sum_k (2k - n - 1) c_k, near-zero count) of one image's |a| (``row``, our own copy,
    sorted here in place); None when the image has a NaN or an infinity."""
    row.sort()  # ascending; NaN sorts last, so row[-1] tells whether the image is finite
    peak = float(row[-1])
    if not math.isfinite(peak):
        return None
    # Zeros (ReLU: about half of the entries) add nothing to any sum: widen and reduce only the rest.
    zeros = int(np.searchsorted(row, row.dtype.type(0), side="right"))
    d = row[zeros:].astype(np.float64)
    near = zeros + int(np.searchsorted(d, threshold * peak, side="right"))
    # einsum, not BLAS (d @ d): single-threaded and deterministic, where OpenBLAS spins up its own threads
    # inside our worker threads and, on a busy 2-core machine, was several times slower.
    sumsq = np.einsum("i,i->", d, d)
    gini_num = np.einsum("i,i->", d, weights[zeros:])
    return float(d.sum()), float(sumsq), float(gini_num), float(near)


_THREADED_ELEMENTS = 1 << 18  # per layer and batch: below it, threads cost more than they save


def _sums_numpy(flat: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Per-image sums from a CPU (B, n) tensor of activations (read, never written)."""
    b, n = flat.shape
    src = flat.numpy()
    weights = _gini_weights(n).numpy()
    local = threading.local()

    def one(i: int) -> tuple[float, float, float, float] | None:
        # |a| of one image into a buffer reused by this thread: no (B, n) copy, and the sort works in place.
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(n, dtype=src.dtype)
        np.abs(src[i], out=buf)
        return _row_sums(buf, weights, threshold)

    # NumPy releases the GIL while it sorts and reduces, and torch's own threads are idle while a hook runs,
    # so images are spread over as many threads as torch uses (each image's result does not depend on it).
    # A small layer is done at once in this thread: starting a pool and handing it one task per image cost 5 ms
    # for a mapper layer of 32 x 512 entries, ten times its arithmetic.
    if b * n < _THREADED_ELEMENTS:
        return _sums_small(src, weights, threshold)
    workers = min(torch.get_num_threads(), b)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, range(b)))
    else:
        results = [one(i) for i in range(b)]
    sums = np.array([r if r is not None else (0.0, 0.0, 0.0, 0.0) for r in results], dtype=np.float64)
    sums = sums.reshape(b, 4)
    finite = np.array([r is not None for r in results], dtype=bool)
    l1, sumsq, gini_num, near = (torch.from_numpy(np.ascontiguousarray(sums[:, j])) for j in range(4))
    return l1, sumsq, gini_num, near, torch.from_numpy(finite)


def _sums_small(src: np.ndarray, weights: np.ndarray, threshold: float) -> tuple[torch.Tensor, ...]:
    """:func:`_sums_numpy` for a small (B, n) layer (a mapper's, a VAE's last): every image at once, as array
    operations. One call per image cost more in Python than the arithmetic (40 us per image for a 512-unit layer),
    and under the decode threads' load those calls also waited for the GIL. Each image's sums are row-wise
    reductions, so they do not depend on the other images of the batch."""
    c = np.abs(src)
    c.sort(axis=1)  # ascending; NaN sorts last, so the last column tells whether an image is finite
    peak = c[:, -1].astype(np.float64)
    finite = np.isfinite(peak)
    d = c.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        # A comparison, not a binary search in the sorted rows: at these sizes the search's dozen steps of small
        # array operations cost more than comparing every entry. NaN compares False: never counted.
        counts = np.count_nonzero(d <= (threshold * peak)[:, None], axis=1).astype(np.float64)
        sums = (d.sum(axis=1), np.einsum("bi,bi->b", d, d), np.einsum("bi,i->b", d, weights), counts)
    l1, sumsq, gini_num, near = (torch.from_numpy(np.where(finite, x, 0.0)) for x in sums)
    return l1, sumsq, gini_num, near, torch.from_numpy(finite)


def _sums_torch(mags: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """The same sums with batched ``torch.sort`` on the tensor's device (CUDA; also correct on CPU, only slower)."""
    b, n = mags.shape
    weights = _gini_weights(n, mags.device)
    parts: list[list[torch.Tensor]] = [[], [], [], [], []]
    step = max(1, _DEVICE_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, b, step):
        c = torch.sort(mags[start : start + step], dim=1).values.to(torch.float64)
        peak = c[:, -1]
        parts[0].append(c.sum(dim=1))
        parts[1].append((c * c).sum(dim=1))
        parts[2].append(c @ weights)
        parts[3].append((c <= (threshold * peak)[:, None]).sum(dim=1).to(torch.float64))
        parts[4].append(torch.isfinite(peak))
    return tuple(torch.cat(p) for p in parts)


def sparsity_metrics(acts: torch.Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> dict[str, torch.Tensor]:
    """Sparsity metrics of one layer's activations for a batch of images (formulas in the module docstring).

    ``acts`` is ``(B, ...)``, flattened per image to ``(B, n)``.  Returns ``metric -> (B,)`` float64 tensors on
    ``acts``' device (the CPU for MPS, which has no float64), keys in :data:`METRICS` order.  ``acts`` is not
    modified.
    """
    return _sparsity_metrics(acts, threshold, method="auto")


def _sparsity_metrics(acts: torch.Tensor, threshold: float, *, method: str) -> dict[str, torch.Tensor]:
    """:func:`sparsity_metrics` with the sort implementation chosen: "auto", "numpy" (CPU) or "torch" (any
    device); the tests check that they agree."""
    threshold = _check_threshold(threshold)
    if acts.dim() < 1:
        raise ValueError("activations need a batch dimension: expected (B, ...), got a 0-d tensor")
    if not acts.is_floating_point():
        raise TypeError(f"activations must be floating point, got {acts.dtype}")
    b = acts.shape[0]
    n = acts[0].numel() if b else math.prod(acts.shape[1:])
    if n == 0:
        raise ValueError(f"activations have no entries per image: shape {tuple(acts.shape)}")
    device = acts.device
    # MPS has no float64: results stay on the CPU there.
    out_device = torch.device("cpu") if device.type == "mps" else device
    with torch.no_grad():
        flat = _rows(acts.detach(), b, n)
        if method == "auto":
            method = "numpy" if device.type == "cpu" else "torch"
        if method == "numpy":
            flat = flat.cpu()
            if flat.dtype in (torch.float16, torch.bfloat16):  # NumPy has no bfloat16; widening is exact
                flat = flat.float()
            sums = _sums_numpy(flat, threshold)
        elif method == "torch":
            sums = _sums_torch(flat.to(out_device).abs(), threshold)  # abs: a new tensor, acts stay as they are
        else:
            raise ValueError(f"unknown method {method!r}")
        l1, sumsq, gini_num, near, finite = (x.to(out_device) for x in sums)
        return _combine(l1, sumsq, gini_num, near, finite, n)


def _combine(
    l1: torch.Tensor, sumsq: torch.Tensor, gini_num: torch.Tensor, near: torch.Tensor, finite: torch.Tensor, n: int
) -> dict[str, torch.Tensor]:
    """The four metrics from the per-image sums (all (B,) float64), with the edge cases of the module docstring."""
    zero = l1 == 0  # sums of non-negative float32/float64 values: 0 exactly when every entry is 0
    safe_l1 = torch.where(zero, torch.ones_like(l1), l1)
    safe_l2 = torch.where(zero, torch.ones_like(l1), sumsq.sqrt())
    ratio = torch.where(zero, torch.zeros_like(l1), safe_l1 / safe_l2)
    root_n = math.sqrt(n)
    if n == 1:
        hoyer = torch.where(zero, 1.0, 0.0).to(torch.float64)
    else:
        hoyer = torch.where(zero, torch.ones_like(l1), ((root_n - ratio) / (root_n - 1.0)).clamp(0.0, 1.0))
    gini = torch.where(zero, torch.ones_like(l1), (gini_num / (n * safe_l1)).clamp(0.0, 1.0))
    out = {"near_zero_fraction": near / n, "hoyer": hoyer, "gini": gini, "l1_l2_ratio": ratio}
    nan = torch.full_like(l1, math.nan)
    return {k: torch.where(finite, out[k], nan) for k in METRICS}


# ------------------------------------------------------------------------------------------------- sampled


def _rows(acts: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """``(b, n)``: each image's entries in memory order. Every metric ignores the order of the entries, so a
    channels-last activation is read where it lies instead of being copied into NCHW order by ``reshape``."""
    if _dense(acts, n):
        return acts.as_strided((b, n), (n, 1), acts.storage_offset())
    return acts.reshape(b, n)


def _dense(acts: torch.Tensor, n: int) -> bool:
    """Each image's n entries lie in one block of n, one image after the other (NCHW or channels-last)."""
    contiguous = acts.is_contiguous() or (acts.dim() == 4 and acts.is_contiguous(memory_format=torch.channels_last))
    return contiguous and acts.shape[0] > 0 and acts.stride(0) == n


def image_seeds(ids: list[str]) -> np.ndarray:
    """One 63-bit seed per image id (blake2b of the id): the sample of an image is the same in every run."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") >> 1
                     for i in ids], dtype=np.uint64)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, element-wise on uint64 (wrapping): a counter-based uniform hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK64


def _uniforms(seeds: np.ndarray, units: int) -> np.ndarray:
    """``(B, units)`` uniform float64 in [0, 1) from each image's seed: counter-based, so no generator is created
    per image (:func:`_stratified_positions` turns them into positions: no modulo bias worth the name, n << 2**53)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(seeds.astype(np.uint64))
        counters = base[:, None] + np.arange(units, dtype=np.uint64)[None, :]
    # The top 53 bits as a float in [0, 1).
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _channels_last(acts: torch.Tensor) -> bool:
    """A 4-D tensor whose entries lie in (H, W, C) order per image (torch's channels-last strides)."""
    if acts.dim() != 4:
        return False
    c, _, w = acts.shape[1:]
    return tuple(acts.stride()[1:]) == (1, w * c, c)


def _offsets_of(acts: torch.Tensor, logical: np.ndarray, dense: bool) -> np.ndarray:
    """Offsets into the rows of :func:`_rows` of the sample's logical positions.

    Logical order is channel-last for a 4-D activation (``((y * W) + x) * C + c``) and the natural order
    otherwise. Where the memory is in that order (a channels-last tensor, the CPU layout of every CNN encoder here,
    or any non-4-D tensor) the positions are the offsets already, in nearly ascending order as
    :func:`_stratified_positions` makes them; an NCHW tensor (dense, or copied into NCHW order by ``reshape``) maps
    them through its layout, in the same order: every layout reads the same entries in the same order (Gini reads
    the even half of the sample by its place in it), at the price of a gather out of address order there."""
    if acts.dim() != 4 or (dense and _channels_last(acts)):
        return logical
    c, h, w = acts.shape[1:]
    pixel, channel = logical // c, logical % c  # pixel = y * W + x
    if dense:
        sc, sh, sw = acts.stride()[1:]
        off = channel * sc + (pixel // w) * sh + (pixel % w) * sw
    else:
        off = channel * (h * w) + pixel  # reshape's copy: NCHW order
    return off


def _channel_count(acts: torch.Tensor) -> int:
    """The length of the last axis of an image's logical order (:func:`_offsets_of`): the channels of a 4-D
    activation, the features of a token of a 3-D one (B, tokens, features); 1 (no channel part) otherwise."""
    if acts.dim() == 4:
        return int(acts.shape[1])
    if acts.dim() == 3:
        return int(acts.shape[2])
    return 1


def _stratified_positions(draw: np.ndarray, n: int, channels: int, pixels: np.ndarray | None = None) -> np.ndarray:
    """``(B, units)`` logical positions of :class:`BatchSample`'s design in layers of ``n`` entries whose logical
    order ends in an axis of ``channels``, from each image's draw ``(B, units + 1)``. ``pixels``: the layer's
    :func:`_pixel_strata` if already at hand (layers of one pixel count share them), else they are computed."""
    units = draw.shape[1] - 1
    group = _pixel_strata(draw, n // channels) if pixels is None else pixels
    if channels == 1:
        return group
    out = group * channels
    # Channel (j + phase) mod C for the even entries and half a cycle on for the odd ones: each half runs
    # through all C channels from a random phase, so every channel is read units / C times (give or take one)
    # and never by chance not at all. Each image's channels are one contiguous run of _channel_cycle's table
    # (a window of it, from twice its phase): a copy per image instead of arithmetic per entry.
    phase = (draw[:, -1] * channels).astype(np.int64)
    out += sliding_window_view(_channel_cycle(channels, units), units)[2 * phase]
    return out


def _pixel_strata(draw: np.ndarray, groups: int) -> np.ndarray:
    """``(B, units)`` pixel (or token) index of every entry of :class:`BatchSample`'s design in a layer of
    ``groups`` pixels: entries 2j and 2j + 1 fall in the j-th of the even entries' (or the odd entries') equal
    strata of the pixels, each uniformly within it."""
    j, strata = _strata(draw.shape[1] - 1)
    group = ((draw[:, :-1] + j) * (groups / strata)).astype(np.int64)
    # The float rounding of (j + v) * groups / strata can reach `groups` only in the last stratum.
    np.minimum(group, groups - 1, out=group)
    return group


@functools.lru_cache(maxsize=8)
def _strata(units: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of a sample's ``units`` entries: its stratum ``j`` within its half, and that half's stratum count."""
    k = np.arange(units, dtype=np.int64)
    j, odd = k // 2, k % 2
    return j, np.where(odd == 0, (units + 1) // 2, units // 2)


@functools.lru_cache(maxsize=64)
def _channel_cycle(channels: int, units: int) -> np.ndarray:
    """The channels of both halves of the sample, interleaved: ``t % C`` at ``2t`` and ``(t + C // 2) % C`` at
    ``2t + 1``, long enough for every phase, so that the window from ``2 * phase`` holds an image's channels for
    all of :func:`_stratified_positions`' entries (entry ``2j`` reads ``(j + phase) % C``, entry ``2j + 1``
    ``(j + phase + C // 2) % C``)."""
    t = np.arange(units // 2 + channels + 1, dtype=np.int64)
    table = np.empty(2 * len(t), dtype=np.int64)
    table[0::2] = t % channels
    table[1::2] = (t + channels // 2) % channels
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=4)
def _draw(ids: tuple[str, ...], units: int) -> np.ndarray:
    """Each image's draw (:func:`_uniforms` of ``units + 1`` numbers), read-only. Cached: every recorded model of a
    run (encoder, VAE) samples the same batch of ids."""
    u = _uniforms(image_seeds(list(ids)), units + 1)
    u.flags.writeable = False
    return u


class BatchSample:
    """Which entries of each image's layers one batch reads: ``units`` positions per image and layer, from the
    image's id (:func:`image_seeds`), so an image is read at the same entries in every run, batch and layout.

    The design is stratified, over the pixels and over the channels, in two interleaved halves. In a layer's
    logical order (channel-last for a 4-D activation: pixels, then channels; :func:`_offsets_of`), the even
    entries ``2j`` of the sample lie one in each of ``ceil(units / 2)`` equal strata of the pixels, at a
    uniformly random place within it, and read channel ``(j + phase) mod C``; the odd entries likewise, half a
    channel cycle on. So each half spreads evenly over the image and runs through all the channels from a random
    phase, and every entry of the layer is read ``units / n`` times in expectation: every sum the metrics use is
    estimated without bias, by either half and by both. The even half is what Gini reads (:func:`gini_units`).
    Each image draws ``units + 1`` uniform numbers once (the places within the strata, and the phase), shared by
    all its layers, so an image's depth profile is read at the same relative places.

    Against the independent uniform positions used until 2026-12-05, the design removes the between-channel part
    of the sampling variance, which dominates in these layers (some channels are nearly always off, others
    nearly always on): on 192 pets photos against the exact metrics, 3,072 entries stratified like this (Gini
    from 1,536) gave a smaller RMS error on every metric than 4,096 independent ones (Gini from 2,048): 0.0058
    against 0.0071 for the near-zero fraction, 0.0047 against 0.0059 for Hoyer, 0.0057 against 0.0069 for Gini,
    1.1% against 1.4% for the L1/L2 ratio (whose largest errors stayed the same, 8.5%), with a quarter fewer
    reads and no sort of the draw. (The halves matter: Gini from every other entry of one channel cycle would
    read only the even channels when C is even.)

    Positions ascend with ``j`` (the pixel strata are in order), up to the two halves and the channel wrapping
    inside a pixel, so in a channels-last layer (the CPU layout of every CNN here) they are memory offsets in
    nearly address order as they are: no sort per layer (a gather in random order misses the cache on every
    entry and cost 40x as much). Every metric ignores the order of the entries."""

    def __init__(self, ids: list[str], units: int = DEFAULT_SAMPLE_UNITS) -> None:
        self.ids = tuple(ids)
        self.units = int(units)
        self._offsets: dict[tuple[Any, ...], torch.Tensor] = {}
        # Pixel strata by pixel count: layers of different shapes often share one (EfficientNet-Lite0: 12 shapes,
        # 6 pixel counts), and computing them is most of the positions' cost.
        self._pixels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def draw(self) -> np.ndarray:
        """``(B, units + 1)`` float64 in [0, 1): each image's draw (:func:`_uniforms`): a place within each
        entry's stratum, then the channel phase."""
        return _draw(self.ids, self.units)

    def offsets(self, acts: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, units)`` offsets into the rows of :func:`_rows`, on ``acts``' device."""
        dense = _dense(acts, n)
        key = (tuple(acts.shape[1:]), tuple(acts.stride()[1:]) if dense else None, acts.device)
        got = self._offsets.get(key)
        if got is None:
            draw, channels = self.draw(), _channel_count(acts)
            pixels = self._pixels.get(n // channels)
            if pixels is None:
                pixels = self._pixels[n // channels] = _pixel_strata(draw, n // channels)
            logical = _stratified_positions(draw, n, channels, pixels)
            got = self._offsets[key] = torch.from_numpy(_offsets_of(acts, logical, dense)).to(acts.device)
        return got


@dataclass
class LayerSample:
    """What a hook keeps of one layer's activations for :func:`finish_samples`: the sampled entries and the
    exact peak ``max |a|`` per image (NaN when the image's activations are not finite), and the layer's size."""

    picked: np.ndarray  # (B, units) float32 magnitudes |a| (NaN where the read was NaN)
    peak: np.ndarray  # (B,) float64
    n: int


def take_sample(acts: torch.Tensor, sample: BatchSample, *, nonnegative: bool = False,
                ceiling: float | None = None) -> LayerSample:
    """Read the sampled entries and the peak of one layer's CPU activations ``(B, ...)`` (``n > units``): the only
    part of the sampled metrics that needs the activations, so a hook can let them go and the arithmetic can run
    for all layers of the batch at once."""
    b, n = acts.shape[0], math.prod(acts.shape[1:])
    rows = _rows(acts, b, n)
    picked = torch.gather(rows, 1, sample.offsets(acts, n)).float().numpy()
    # The peak over the whole layer, so the near-zero threshold is exact. Reading the whole layer is most of the
    # cost of sampling, and often needless: a ReLU6 image whose sample already reaches 6 has its peak (6 is as
    # high as it goes). Other images: max (a ReLU) or min and max in one pass, one image at a time over its row
    # (torch's reductions use both cores here: 25% faster than NumPy's max, 2x its max + min; torch's
    # batched aminmax(dim=1) over these rows was 9x slower), and no |a| copy.
    # Every metric reads magnitudes: |a| once here (a ReLU's entries are their own), none in finish_samples.
    if not nonnegative:
        np.abs(picked, out=picked)
    top = picked.max(axis=1).astype(np.float64) if picked.size else np.zeros(b)
    with np.errstate(invalid="ignore"):
        full = np.ones(b, dtype=bool) if ceiling is None or not nonnegative else ~(top >= ceiling)
    peak = top.copy()
    for i in np.flatnonzero(full):
        if nonnegative:
            peak[i] = float(rows[i].max())
        else:
            lo, hi = torch.aminmax(rows[i])
            peak[i] = max(float(hi), -float(lo))
    # A NaN anywhere in the sample makes the image's metrics NaN, as one in the full read does.
    peak[~np.isfinite(top)] = math.nan
    return LayerSample(picked, peak, n)


def gini_units(units: int) -> int:
    """How many of a sample's ``units`` entries its Gini index is computed from: the even half of the sample
    (:class:`BatchSample`: itself a sample stratified over the pixels and the channels), cut into equal blocks of
    at most :data:`GINI_BLOCK` (:func:`_gini_order`; up to ``blocks - 1`` entries of the half are left out so
    that the blocks are equal: none at the default 3,072). Gini is the only metric that needs its entries
    sorted; the near-zero fraction, Hoyer and the L1/L2 ratio, which are sums, read every entry."""
    blocks, size = _gini_blocks(units)
    return blocks * size


# Seeds the fixed order that deals the even half's entries into Gini's blocks.
_GINI_ORDER_SEED = 0x61A1


def _gini_blocks(units: int) -> tuple[int, int]:
    """(blocks, entries per block) of Gini in a sample of ``units``: its even half, ``m = ceil(units / 2)``
    entries, in as few blocks of at most :data:`GINI_BLOCK` as will do, all of one size."""
    m = (int(units) + 1) // 2
    blocks = max(1, -(-m // GINI_BLOCK))
    return blocks, max(1, m // blocks)


@functools.lru_cache(maxsize=8)
def _gini_order(units: int) -> np.ndarray:
    """Where Gini's entries lie in a sample of ``units``, block after block (:func:`gini_units` of them): the
    sample's even entries dealt into the blocks by one fixed pseudo-random permutation.

    Random, because a block's pairs of entries must be like any pair of the half: blocks of consecutive strata
    (bands of the image) or of every third stratum (a third of the channels when 3 divides C) biased some layers'
    Gini by up to 0.008 on average over 64 pets photos, against at most 0.0021 dealt at random. Fixed, so that
    every image is read the same way in every run."""
    blocks, size = _gini_blocks(units)
    order = 2 * np.random.default_rng(_GINI_ORDER_SEED).permutation((units + 1) // 2)[: blocks * size]
    order.flags.writeable = False
    return order


def _gini_from_blocks(g: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Gini estimates ``(...)`` from blocks ``(..., blocks, size)`` of magnitudes, each sorted ascending, for layers
    of ``n`` entries (broadcast against ``(...)``).

    The exact metric (module docstring) is ``G = (n - 1) / (2 n) * D / mu`` with ``D`` the mean of ``|a_i - a_j|``
    over the layer's pairs of entries and ``mu`` its mean |a|. Within a sorted block ``sum_{i<j} |c_i - c_j| =
    sum_k (2k - size - 1) c_k``; the blocks' pairs, averaged, estimate ``D`` without bias (an incomplete
    U-statistic, with the variance of the complete one to first order), and their entries' mean estimates
    ``mu``: ``G = (n - 1) / n * sum_blocks sum_k (2k - size - 1) c_k / ((size - 1) * sum |c|)``. A block of one
    entry has no pair: Gini 0. No active entry among Gini's: 1.0, the sparse end, as for an all-zero layer."""
    size = g.shape[-1]
    weights = _gini_weights(size).numpy().astype(np.float32)
    pairs_sum = np.einsum("...rk,k->...", g, weights).astype(np.float64)  # float32 sums: as in finish_samples
    return _gini_value(pairs_sum, np.einsum("...rk->...", g).astype(np.float64), size, n)


def _gini_value(pairs_sum: np.ndarray, total: np.ndarray, size: int, n: np.ndarray | float) -> np.ndarray:
    """:func:`_gini_from_blocks`' formula from its two sums (``sum_blocks sum_k (2k - size - 1) c_k`` and
    ``sum |c|``), blocks of ``size``, layers of ``n`` entries."""
    zero = total == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        gini = (n - 1) / n * pairs_sum / (max(size - 1, 1) * np.where(zero, 1.0, total))
    return np.where(zero, 1.0, np.clip(gini, 0.0, 1.0))


def finish_samples(parts: list[LayerSample], threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``(L, len(METRICS), B)`` float64 metrics of the layers whose samples :func:`take_sample` read (all from
    the same batch and :class:`BatchSample`): sums and near-zero counts over every sampled entry, Gini from
    :func:`gini_units` of them sorted in blocks (:func:`_gini_from_blocks`), for all layers at once, in one
    thread (two took less alone, but in an indexing run the second core is the decode thread's or torch's
    spinning OpenMP worker's), and the edge cases of :func:`_combine` as array operations (per layer it was 40
    small tensor ops)."""
    threshold = _check_threshold(threshold)
    if not parts:
        return np.zeros((0, len(METRICS), 0), dtype=np.float64)
    c = np.stack([p.picked for p in parts])  # (L, B, units) float32 magnitudes
    peak = np.stack([p.peak for p in parts])  # (L, B)
    n = np.array([p.n for p in parts], dtype=np.float64)[:, None]  # (L, 1)
    units = c.shape[2]
    # Sums in float32 (NumPy's einsum: single-threaded, so every run adds in the same order), widened after:
    # their rounding (about 1e-6 relative) is four orders below the sampling error, and float64 sums over the
    # samples took 4x as long.
    l1 = np.einsum("lbu->lb", c).astype(np.float64)
    sumsq = np.einsum("lbu,lbu->lb", c, c).astype(np.float64)
    # A float32 c is <= a float64 t exactly when it is <= t rounded down to float32.
    t = threshold * peak
    t32 = t.astype(np.float32)
    with np.errstate(invalid="ignore"):
        t32 = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32)
        near = np.count_nonzero(c <= t32[..., None], axis=-1) / units  # NaN compares False: never counted
    blocks, size = _gini_blocks(units)
    g = np.take(c, _gini_order(units), axis=-1).reshape(*c.shape[:2], blocks, size)
    g.sort(axis=-1)
    gini = _gini_from_blocks(g, n)
    # take_sample makes the peak NaN when the sample holds a NaN or an infinity; l1 says it too.
    finite = np.isfinite(peak) & np.isfinite(l1)
    zero = l1 == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        # L1 grows like the count and L2 like its square root: the layer's ratio is the sample's times
        # sqrt(n / units); Hoyer then uses the layer's own n.
        ratio = np.where(zero, 0.0, l1 / np.sqrt(sumsq) * np.sqrt(n / units))
        root_n = np.sqrt(n)
        hoyer = np.where(zero, 1.0, np.clip((root_n - ratio) / (root_n - 1.0), 0.0, 1.0))
    out = np.stack([near, hoyer, gini, ratio], axis=1)  # (L, 4, B), METRICS order
    return np.where(finite[:, None, :], out, math.nan)


def sampled_sparsity_metrics(acts: torch.Tensor, sample: BatchSample, *, threshold: float = DEFAULT_THRESHOLD,
                             nonnegative: bool = False, ceiling: float | None = None) -> dict[str, torch.Tensor]:
    """:func:`sparsity_metrics` estimated from ``sample.units`` random entries per image (module docstring).

    ``sample`` (a :class:`BatchSample` of the batch's ids) fixes which entries; a layer of at most that many
    entries per image is computed exactly. ``nonnegative``: the layer cannot output a negative number (a ReLU),
    so its peak is its max and the min is not computed; ``ceiling``: nor one above this (6 for a ReLU6), so an
    image whose sample reaches it has its peak without reading the whole layer. One layer at a time; the
    recorder reads every layer with :func:`take_sample` and finishes the batch with :func:`finish_samples`."""
    threshold = _check_threshold(threshold)
    if acts.dim() < 2 or not acts.is_floating_point():
        return sparsity_metrics(acts, threshold=threshold)  # the exact path's own checks and messages
    b, n = acts.shape[0], math.prod(acts.shape[1:])
    if n <= sample.units or b == 0:
        return sparsity_metrics(acts, threshold=threshold)
    if len(sample) != b:
        raise ValueError(f"a sample of {len(sample)} images for a batch of {b} images")
    out_device = torch.device("cpu") if acts.device.type == "mps" else acts.device
    with torch.no_grad():
        acts = acts.detach()
        if acts.device.type == "cuda":
            return _sampled_torch(acts, sample, threshold, nonnegative, n, out_device)
        part = take_sample(acts.cpu(), sample, nonnegative=nonnegative, ceiling=ceiling)
        values = finish_samples([part], threshold)[0]
        return {m: torch.from_numpy(values[j].copy()).to(out_device) for j, m in enumerate(METRICS)}


def _sampled_torch(acts: torch.Tensor, sample: BatchSample, threshold: float, nonnegative: bool, n: int,
                   out_device: torch.device) -> dict[str, torch.Tensor]:
    """The sampled metrics with torch on the activations' device (CUDA), one layer at a time."""
    b, units = acts.shape[0], sample.units
    rows = _rows(acts, b, n)
    picked = torch.gather(rows, 1, sample.offsets(acts, n)).float()
    top = rows.amax(dim=1)
    peak = (top if nonnegative else torch.maximum(top, -rows.amin(dim=1))).to(torch.float64)
    c = picked.abs().to(torch.float64)
    near = (c <= (threshold * peak)[:, None]).sum(dim=1).to(torch.float64)
    blocks, size = _gini_blocks(units)
    order = torch.from_numpy(_gini_order(units).copy()).to(c.device)
    g = torch.sort(c[:, order].reshape(b, blocks, size), dim=2).values  # Gini's blocks, as on the CPU
    gini_np = _gini_value((g @ _gini_weights(size, g.device)).sum(dim=1).cpu().numpy(),
                          g.sum(dim=(1, 2)).cpu().numpy(), size, float(n))
    gini = torch.from_numpy(gini_np).to(c.device)
    l1 = c.sum(dim=1)
    finite = torch.isfinite(peak) & torch.isfinite(l1)  # l1 is NaN or infinite when an entry is
    out = _combine(l1, (c * c).sum(dim=1), torch.zeros_like(l1), near, finite, units)
    # L1 grows like the count and L2 like its square root: the layer's ratio is the sample's times
    # sqrt(n / units); Hoyer then uses the layer's own n.
    ratio = out["l1_l2_ratio"] * math.sqrt(n / units)
    zero = l1 == 0
    root_n = math.sqrt(n)
    hoyer = torch.where(zero, torch.ones_like(ratio), ((root_n - ratio) / (root_n - 1.0)).clamp(0.0, 1.0))
    nan = torch.full_like(ratio, math.nan)
    out["l1_l2_ratio"] = torch.where(finite, ratio, nan)
    out["hoyer"] = torch.where(finite, hoyer, nan)
    out["gini"] = torch.where(finite, gini, nan)
    return {k: v.to(out_device) for k, v in out.items()}
