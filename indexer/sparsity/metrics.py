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
:data:`DEFAULT_SAMPLE_UNITS`) entries of each image's layer drawn uniformly at random with replacement, so that
the cost no longer grows with the layer (EfficientNet-Lite0's 33 layers hold 3.4 M activations per 224 px image:
the exact sort costs about twice the forward pass itself).  The draw is seeded by the image's id and the layer's
size (:class:`BatchSample`), so an image gets the same numbers in every run, batch and memory layout, and it
differs from image to image, so the errors average out over a group of images instead of biasing a layer.

- the peak ``s = max |a|`` is exact (a full-layer max, and min unless the layer is a ReLU: no sort; in a ReLU6
  layer an image whose sample reaches 6 has its peak without it), so ``near_zero_fraction`` is an unbiased
  estimate of the exact fraction (one consequence: a NaN that the sample misses in such a layer goes unseen;
  a decoded photo gives none);
- ``near_zero_fraction`` and ``gini`` are those of the sample;
- ``l1_l2_ratio`` is the sample's ratio times ``sqrt(n / units)`` (L1 scales with the count, L2 with its root),
  and ``hoyer`` is computed from that estimate with the layer's true ``n``.

Error (binomial: a fraction estimated from ``units`` draws has standard error at most ``0.5 / sqrt(units)``,
0.008 at 4,096): measured on the 1,140 pets photos against the exact metrics (every image, all 33 layers of
EfficientNet-Lite0), see ``tests/test_sparsity.py`` for the asserted bounds: per image and layer, at most 0.04 for
``near_zero_fraction``, ``hoyer`` and ``gini`` and 15% relative for ``l1_l2_ratio``; a layer's mean over 64
images within 0.005 (1% relative for ``l1_l2_ratio``; measured: 0.001 and 0.2%).  Layers with at most ``units``
entries are computed exactly.

:data:`DEFAULT_THRESHOLD` is ``indexer.defaults.SPARSITY_THRESHOLD``.
"""


from __future__ import annotations

import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from indexer import defaults

__all__ = ["DEFAULT_SAMPLE_UNITS", "DEFAULT_THRESHOLD", "METRICS", "BatchSample", "image_seeds",
           "sampled_sparsity_metrics", "sparsity_metrics"]

METRICS: tuple[str, ...] = ("near_zero_fraction", "hoyer", "gini", "l1_l2_ratio")

DEFAULT_THRESHOLD: float = defaults.SPARSITY_THRESHOLD  # see indexer/defaults.py
DEFAULT_SAMPLE_UNITS: int = defaults.SPARSITY_SAMPLE_UNITS

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


def _positions(seeds: np.ndarray, salt: int, units: int, n: int) -> np.ndarray:
    """``(B, units)`` logical positions in ``[0, n)`` (NCHW order), uniform with replacement, from each image's
    seed and a ``salt``: counter-based, so no generator is created per image."""
    with np.errstate(over="ignore"):
        base = _splitmix64(seeds.astype(np.uint64) ^ _splitmix64(np.array([salt], dtype=np.uint64)))
        counters = base[:, None] + np.arange(units, dtype=np.uint64)[None, :]
    # The top 53 bits as a float in [0, 1), times n: no modulo bias worth the name (n << 2**53).
    u = (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((u * n).astype(np.int64), n - 1)


def _memory_offsets(acts: torch.Tensor, logical: np.ndarray) -> torch.Tensor:
    """Offsets (relative to each image's first entry) of NCHW-order positions, through the tensor's strides."""
    c, h, w = (*acts.shape[1:], 0, 0, 0)[:3]
    if acts.dim() == 4 and tuple(acts.stride()[1:]) == (1, w * c, c):
        # Channels-last, the CPU layout of every CNN encoder here: (c, hw) -> hw * C + c in two operations
        # instead of the loop's twelve (this ran for every layer shape of every batch).
        hw_size = h * w
        return torch.from_numpy((logical % hw_size) * c + logical // hw_size)
    off = np.zeros_like(logical)
    rem = logical.copy()
    for size, stride in zip(reversed(acts.shape[1:]), reversed(acts.stride()[1:]), strict=True):
        off += (rem % size) * stride
        rem //= size
    return torch.from_numpy(off)


class BatchSample:
    """Which entries of each image's layers one batch reads: ``units`` positions per image and layer shape, drawn
    from the image's id (:func:`image_seeds`) and the layer's size, so an image is read at the same entries in
    every run and batch. Layers of the same shape share their positions within an image (their estimates are
    each unbiased; sharing only correlates the errors of same-shaped layers), which lets the batch compute them,
    and sort them into address order, once per shape."""

    def __init__(self, ids: list[str], units: int = DEFAULT_SAMPLE_UNITS) -> None:
        self.seeds = image_seeds(ids)
        self.units = int(units)
        self._offsets: dict[tuple[Any, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def offsets(self, acts: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, units)`` offsets into the rows of :func:`_rows` (sorted per image), on ``acts``' device."""
        dense = _dense(acts, n)
        key = (tuple(acts.shape[1:]), tuple(acts.stride()[1:]) if dense else None, acts.device)
        got = self._offsets.get(key)
        if got is None:
            logical = _positions(self.seeds, n, self.units, n)
            # In a memory-order view the NCHW positions go through the strides (the same entries in any
            # layout); a copy made by reshape is in NCHW order already.
            off = _memory_offsets(acts, logical).numpy() if dense else logical
            # Address order (the metrics ignore order): a gather in random order misses the cache on every
            # entry and cost 40x as much here.
            got = self._offsets[key] = torch.from_numpy(np.sort(off, axis=1)).to(acts.device)
        return got


def _sample_sums_numpy(rows: torch.Tensor, sample: torch.Tensor, threshold: float, nonnegative: bool,
                       ceiling: float | None) -> tuple[torch.Tensor, ...]:
    """(L1, sum of squares, Gini numerator, near-zero count, finite) of each row of ``sample`` (float32, CPU),
    the near-zero threshold relative to the peak of the whole row of ``rows``."""
    c = np.sort(np.abs(sample.numpy()), axis=1)
    # The peak over the whole layer, so the near-zero threshold is exact. Reading the whole layer is most of the
    # cost of sampling, and often needless: a ReLU6 image whose sample already reaches 6 has its peak (6 is as
    # high as it goes). Other images: max (and min unless the layer is a ReLU), with NumPy, several times faster
    # than torch over these (B, n) views, and no |a| copy.
    r = rows.numpy() if rows.dtype != torch.bfloat16 else rows.float().numpy()
    peak = c[:, -1].astype(np.float64)
    full = np.ones(len(c), dtype=bool) if ceiling is None or not nonnegative else ~(peak >= ceiling)
    for i in np.flatnonzero(full):
        top = float(r[i].max())
        peak[i] = top if nonnegative else max(top, -float(r[i].min()))
    c = c.astype(np.float64)
    weights = _gini_weights(c.shape[1]).numpy()
    sums = (c.sum(axis=1), np.einsum("ij,ij->i", c, c), c @ weights,
            (c <= (threshold * peak)[:, None]).sum(axis=1).astype(np.float64),
            np.isfinite(peak) & np.isfinite(c[:, -1]))
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in sums)


def _sample_sums_torch(rows: torch.Tensor, sample: torch.Tensor, threshold: float, nonnegative: bool,
                       ceiling: float | None) -> tuple[torch.Tensor, ...]:
    """:func:`_sample_sums_numpy` with torch on the tensors' device (CUDA)."""
    top = rows.amax(dim=1)
    peak = (top if nonnegative else torch.maximum(top, -rows.amin(dim=1))).to(torch.float64)
    c = torch.sort(sample.abs(), dim=1).values.to(torch.float64)
    weights = _gini_weights(c.shape[1], c.device)
    near = (c <= (threshold * peak)[:, None]).sum(dim=1).to(torch.float64)
    return c.sum(dim=1), (c * c).sum(dim=1), c @ weights, near, torch.isfinite(peak) & torch.isfinite(c[:, -1])


def sampled_sparsity_metrics(acts: torch.Tensor, sample: BatchSample, *, threshold: float = DEFAULT_THRESHOLD,
                             nonnegative: bool = False, ceiling: float | None = None) -> dict[str, torch.Tensor]:
    """:func:`sparsity_metrics` estimated from ``sample.units`` random entries per image (module docstring).

    ``sample`` (a :class:`BatchSample` of the batch's ids) fixes which entries; a layer of at most that many
    entries per image is computed exactly. ``nonnegative``: the layer cannot output a negative number (a ReLU),
    so its peak is its max and the min is not computed; ``ceiling``: nor one above this (6 for a ReLU6), so an
    image whose sample reaches it has its peak without reading the whole layer."""
    threshold = _check_threshold(threshold)
    if acts.dim() < 2 or not acts.is_floating_point():
        return sparsity_metrics(acts, threshold=threshold)  # the exact path's own checks and messages
    b, n = acts.shape[0], math.prod(acts.shape[1:])
    units = sample.units
    if n <= units or b == 0:
        return sparsity_metrics(acts, threshold=threshold)
    if len(sample) != b:
        raise ValueError(f"a sample of {len(sample)} images for a batch of {b} images")
    out_device = torch.device("cpu") if acts.device.type == "mps" else acts.device
    with torch.no_grad():
        acts = acts.detach()
        rows = _rows(acts, b, n)
        picked = torch.gather(rows, 1, sample.offsets(acts, n)).float()
        if acts.device.type == "cuda":
            sums = _sample_sums_torch(rows, picked, threshold, nonnegative, ceiling)
        else:  # the CPU, and MPS (no float64 there) through the CPU
            sums = _sample_sums_numpy(rows.cpu(), picked.cpu(), threshold, nonnegative, ceiling)
        l1, sumsq, gini_num, near, finite = (x.to(out_device) for x in sums)
        out = _combine(l1, sumsq, gini_num, near, finite, units)
        # L1 grows like the count and L2 like its square root: the layer's ratio is the sample's times
        # sqrt(n / units); Hoyer then uses the layer's own n.
        ratio = out["l1_l2_ratio"] * math.sqrt(n / units)
        zero = l1 == 0
        root_n = math.sqrt(n)
        hoyer = torch.where(zero, torch.ones_like(ratio), ((root_n - ratio) / (root_n - 1.0)).clamp(0.0, 1.0))
        nan = torch.full_like(ratio, math.nan)
        out["l1_l2_ratio"] = torch.where(finite, ratio, nan)
        out["hoyer"] = torch.where(finite, hoyer, nan)
        return out
