"""RBF kernel and its median-heuristic bandwidth, as pure torch functions.

The kernel is the paper's (Section 3.2): k(z, z') = exp(-||z - z'||² / σ²) -- σ², with no factor 2.
The bandwidth follows the reference setting: σ = 2 x the median pairwise distance on a ~1%
random subsample of the features.
"""

from __future__ import annotations

import math

import torch

from sparseseg.errors import SparsesegError

__all__ = ["rbf", "median_bandwidth", "check_sigma", "random_projection"]


def check_sigma(sigma: float) -> float:
    """Return `sigma` as a float, or raise SparsesegError unless it is finite and > 0."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise SparsesegError(f"sigma={sigma!r} is not a number; expected a positive float") from None
    if not math.isfinite(value) or value <= 0.0:
        raise SparsesegError(f"sigma={sigma!r}; expected a finite bandwidth > 0")
    return value


def check_matrix(x: object, name: str) -> torch.Tensor:
    """`x` as an (n, D) floating-point tensor, or a SparsesegError naming `name` and what it got."""
    if not isinstance(x, torch.Tensor):
        raise SparsesegError(f"{name} must be a torch.Tensor of shape (n, D); got {type(x).__name__}")
    if x.ndim != 2:
        raise SparsesegError(f"{name} must have shape (n, D); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise SparsesegError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    return x


def rbf(
    a: torch.Tensor,
    b: torch.Tensor,
    sigma: float,
    *,
    a_sqnorm: torch.Tensor | None = None,
    b_sqnorm: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RBF kernel matrix k(a_i, b_j) = exp(-||a_i - b_j||² / σ²).

    The squared distance is computed as ||a||² + ||b||² - 2 a·b (one matmul, no (n, m, D)
    temporary) and clamped at 0, since rounding can make it slightly negative.

    Args:
        a: (n, D) floating tensor.
        b: (m, D) floating tensor, same dtype and device as `a`.
        sigma: bandwidth σ > 0.
        a_sqnorm: optional precomputed (n,) squared norms of the rows of `a` (callers that
            evaluate many blocks against the same pool pass them to avoid recomputation).
        b_sqnorm: optional precomputed (m,) squared norms of the rows of `b`.
        out: optional contiguous (n, m) tensor (dtype and device of `a`) to write the kernel
            into, e.g. a block of rows of a larger kernel; None: a new tensor.

    Returns:
        (n, m) tensor in the dtype of `a` (`out` when given), values in (0, 1].

    Raises:
        SparsesegError: on non-2-D inputs, mismatched feature dimensions, or a bad `sigma`.
    """
    a = check_matrix(a, "a")
    b = check_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise SparsesegError(
            f"a and b must have the same feature dimension; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    s = check_sigma(sigma)
    if a_sqnorm is None:
        a_sqnorm = (a * a).sum(dim=1)
    elif tuple(a_sqnorm.shape) != (a.shape[0],):
        raise SparsesegError(f"a_sqnorm must have shape ({a.shape[0]},); got {tuple(a_sqnorm.shape)}")
    if b_sqnorm is None:
        b_sqnorm = (b * b).sum(dim=1)
    elif tuple(b_sqnorm.shape) != (b.shape[0],):
        raise SparsesegError(f"b_sqnorm must have shape ({b.shape[0]},); got {tuple(b_sqnorm.shape)}")
    # One (n, m) buffer, updated in place (peak memory = the output). Elementwise ops after a
    # plain matmul, not addmm: callers rely on identical rows giving bit-identical values.
    if out is None:
        out = a @ b.T
    elif tuple(out.shape) != (a.shape[0], b.shape[0]) or not out.is_contiguous():
        raise SparsesegError(f"out must be a contiguous ({a.shape[0]}, {b.shape[0]}) tensor; got {tuple(out.shape)}")
    else:
        torch.matmul(a, b.T, out=out)
    out.mul_(-2.0).add_(a_sqnorm[:, None]).add_(b_sqnorm[None, :])
    out.clamp_(min=0.0).mul_(-1.0 / (s * s))
    return out.exp_()


def median_bandwidth(
    z: torch.Tensor,
    fraction: float = 0.01,
    min_points: int = 100,
    max_points: int = 2000,
    generator: torch.Generator | None = None,
) -> float:
    """Median-heuristic bandwidth: σ = 2 x median pairwise Euclidean distance.

    The distances are taken over a random subsample of m = max(min_points, ceil(fraction·n))
    rows, capped at `max_points` and at n, over the m(m-1)/2 distinct pairs (the zero diagonal is
    excluded). The median of an even count is the mean of the two middle values (as numpy).

    Args:
        z: (n, D) floating features, n >= 2.
        fraction: share of the rows to subsample (the reference uses 1%).
        min_points: lower bound on the subsample size.
        max_points: upper bound on the subsample size (the subsample's m x m distance matrix is
            held in memory).
        generator: torch.Generator for the subsample (CPU or on z's device); None uses the global RNG.

    Returns:
        σ as a Python float.

    Raises:
        SparsesegError: bad arguments, fewer than 2 rows, or a zero median distance (the sampled
            features are identical: pass sigma explicitly).
    """
    z = check_matrix(z, "z")
    n = z.shape[0]
    if n < 2:
        raise SparsesegError(f"z has n={n} rows; the median bandwidth needs at least 2")
    if not (0.0 < float(fraction) <= 1.0):
        raise SparsesegError(f"fraction={fraction!r}; expected a value in (0, 1]")
    if int(min_points) < 2 or int(max_points) < 2:
        raise SparsesegError(
            f"min_points={min_points!r}, max_points={max_points!r}; both must be integers >= 2"
        )
    perm = bandwidth_subsample(n, fraction, min_points, max_points, generator).to(z.device)
    return subsample_bandwidth(z[perm])


def bandwidth_subsample(n: int, fraction: float = 0.01, min_points: int = 100, max_points: int = 2000,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(m,) the rows `median_bandwidth` draws from an n-row pool with these arguments, in its order.

    A pool spread over processes or files reads just these rows and passes them to
    `subsample_bandwidth`: the same sigma as `median_bandwidth` on the whole pool, bit for bit.
    """
    m = max(int(min_points), math.ceil(float(fraction) * n))
    m = min(m, int(max_points), n)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device)[:m]


def subsample_bandwidth(sub: torch.Tensor) -> float:
    """σ = 2 x median pairwise distance of the (m, D) subsample rows, in the order given (m >= 2)."""
    m = sub.shape[0]
    sq = (sub * sub).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (sub @ sub.T)).clamp_(min=0.0)
    iu = torch.triu_indices(m, m, offset=1, device=sub.device)
    dist = d2[iu[0], iu[1]].sqrt()
    # Median of an even count: mean of the two middle values (numpy's convention).
    srt = torch.sort(dist.double()).values
    c = srt.numel()
    med = float(srt[c // 2]) if c % 2 else float((srt[c // 2 - 1] + srt[c // 2]) / 2)
    if not math.isfinite(med) or med <= 0.0:
        raise SparsesegError(
            f"median pairwise distance of the {m} sampled features is {med!r} (identical or "
            "non-finite features); pass sigma explicitly"
        )
    return 2.0 * med


def random_projection(d_in: int, d_out: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian random projection matrix for z -> z @ P, with entries N(0, 1/d_out).

    E||xP||² = ||x||² for every x, and with d_out = O(log n / ε²) all pairwise squared distances
    of n points keep within a factor 1 ± ε with high probability (Johnson-Lindenstrauss), so an
    RBF kernel on projected features approximates the kernel on the originals at d_out/d_in of
    the cost of its matrix product.

    Args:
        d_in: feature dimension D.
        d_out: projected dimension, >= 1.
        generator: torch.Generator (CPU) for the draw; None uses the global RNG.

    Returns:
        (d_in, d_out) float32 tensor on the CPU.

    Raises:
        SparsesegError: a dimension below 1.
    """
    if int(d_in) < 1 or int(d_out) < 1:
        raise SparsesegError(f"random_projection({d_in!r}, {d_out!r}); both dimensions must be >= 1")
    return torch.randn(int(d_in), int(d_out), generator=generator) / math.sqrt(int(d_out))
