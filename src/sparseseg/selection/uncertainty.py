"""Per-pixel uncertainty scores from probability samples (paper Section 3.3).

Every function takes `probs` shaped (S, N, C): S probability samples (noisy-feature draws for
DALD/eDALD, MC-dropout passes for BALD; S = 1 for a single deterministic pass), N pixels and C
classes, each (s, n) row summing to 1. Scores are (N,) tensors, natural log, and higher always
means more informative (select the top-b). 0·log 0 is taken as 0 (xlogy), so one-hot rows give
0 entropy rather than NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseseg.errors import SparsesegError

__all__ = ["entropy", "margin", "least_confidence", "mutual_information", "edald", "balanced_entropy", "balentacq"]

#: Allowed deviation of a probability row's sum from 1.
SUM_TOLERANCE = 1e-3


def _check_probs(probs: object, name: str = "probs") -> torch.Tensor:
    if isinstance(probs, np.ndarray):
        probs = torch.from_numpy(probs)
    if not isinstance(probs, torch.Tensor):
        raise SparsesegError(
            f"{name} must be a torch.Tensor of shape (S samples, N pixels, C classes); "
            f"got {type(probs).__name__}"
        )
    if probs.ndim == 2:
        raise SparsesegError(
            f"{name} has shape {tuple(probs.shape)}; expected (S samples, N pixels, C classes): "
            f"add a samples axis of size 1 ({name}[None]) for a single pass"
        )
    if probs.ndim != 3:
        raise SparsesegError(
            f"{name} has shape {tuple(probs.shape)}; expected (S samples, N pixels, C classes)"
        )
    if not probs.is_floating_point():
        raise SparsesegError(f"{name} must be floating-point probabilities; got dtype {probs.dtype}")
    if probs.shape[0] == 0 or probs.shape[2] == 0:
        raise SparsesegError(f"{name} has shape {tuple(probs.shape)}; S and C must be at least 1")
    if probs.numel() == 0:
        return probs
    if not bool(torch.isfinite(probs).all()):
        raise SparsesegError(f"{name} contains NaN or infinite values")
    lo = float(probs.min())
    if lo < -SUM_TOLERANCE:
        raise SparsesegError(f"{name} has a negative value {lo:.4g}; expected probabilities (softmax output)")
    sums = probs.sum(dim=-1)
    dev = (sums - 1.0).abs()
    if float(dev.max()) > SUM_TOLERANCE:
        s, n = np.unravel_index(int(dev.argmax()), tuple(dev.shape))
        raise SparsesegError(
            f"{name} of shape {tuple(probs.shape)} must sum to 1 along the class axis (tolerance "
            f"{SUM_TOLERANCE}); sample {s}, pixel {n} sums to {float(sums[s, n]):.6g}: pass softmax "
            "probabilities, not logits"
        )
    return probs


def _entropy_last(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy along the last axis, 0·log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy H(mean_s p_s). Averages over the S samples first.

    Args:
        probs: (S, N, C) probabilities.

    Returns:
        (N,) entropies in [0, log C].
    """
    p = _check_probs(probs)
    return _entropy_last(p.mean(dim=0))


def margin(probs: torch.Tensor) -> torch.Tensor:
    """Negative margin -(top1 - top2) of the mean over S. Averages over the S samples first.

    Negated so that higher = more informative (a small margin is ambiguous).

    Args:
        probs: (S, N, C) probabilities, C >= 2.

    Returns:
        (N,) scores in [-1, 0].
    """
    p = _check_probs(probs)
    if p.shape[2] < 2:
        raise SparsesegError(f"probs has C={p.shape[2]} classes; margin needs at least 2")
    top2 = p.mean(dim=0).topk(2, dim=-1).values
    return -(top2[:, 0] - top2[:, 1])


def least_confidence(probs: torch.Tensor) -> torch.Tensor:
    """1 - max_c of the mean over S. Averages over the S samples first.

    Args:
        probs: (S, N, C) probabilities.

    Returns:
        (N,) scores in [0, 1 - 1/C].
    """
    p = _check_probs(probs)
    return 1.0 - p.mean(dim=0).amax(dim=-1)


def _mutual_information(p: torch.Tensor) -> torch.Tensor:
    mi = _entropy_last(p.mean(dim=0)) - _entropy_last(p).mean(dim=0)
    # Non-negative by Jensen; rounding can leave ~-1e-7.
    return mi.clamp_(min=0.0)


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """BALD / DALD disagreement: I = H(mean_s p_s) - mean_s H(p_s) (paper Eq. 5-7).

    The first term averages over S first (entropy of the mean, Eq. 7); the second averages the
    per-sample entropies (Eq. 6). With S = 1 it is identically 0.

    Args:
        probs: (S, N, C) probabilities.

    Returns:
        (N,) mutual information in [0, log C], tiny negative rounding clamped to 0.
    """
    return _mutual_information(_check_probs(probs))


def edald(probs: torch.Tensor, probs_z0: torch.Tensor) -> torch.Tensor:
    """Entropy-augmented DALD (paper Eq. 8): I(Ŷ; Z | x) + H(Ŷ | z(0), x).

    The MI term uses the S noisy samples (averages over S as in `mutual_information`); the
    entropy term is the plain entropy of one independent sample z(0), not part of the S.

    This implements the paper's formula. The reference code (jn-kim/two-stage-edald) passes
    softmax probabilities where log-probabilities are expected, so its MI term is computed on
    exp(p) and its scores differ from these.

    Args:
        probs: (S, N, C) probabilities from the S noisy feature samples.
        probs_z0: (N, C) or (1, N, C) probabilities from the independent sample z(0).

    Returns:
        (N,) scores in [0, 2 log C].
    """
    p = _check_probs(probs)
    if isinstance(probs_z0, np.ndarray):
        probs_z0 = torch.from_numpy(probs_z0)
    if isinstance(probs_z0, torch.Tensor) and probs_z0.ndim == 2:
        probs_z0 = probs_z0[None]
    q = _check_probs(probs_z0, "probs_z0")
    if q.shape[0] != 1 or q.shape[1:] != p.shape[1:]:
        raise SparsesegError(
            f"probs_z0 has shape {tuple(q.shape)}; expected ({p.shape[1]}, {p.shape[2]}) or "
            f"(1, {p.shape[1]}, {p.shape[2]}) to match probs {tuple(p.shape)}"
        )
    return _mutual_information(p) + _entropy_last(q[0].to(device=p.device, dtype=p.dtype))


def _beta_entropy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differential entropy of Beta(a, b) (always <= 0, 0 only for the uniform Beta(1, 1))."""
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return (log_beta - (a - 1) * torch.digamma(a) - (b - 1) * torch.digamma(b)
            + (a + b - 2) * torch.digamma(a + b))


#: Smallest variance used when fitting a Beta to a class marginal (identical samples have 0).
BETA_MIN_VARIANCE = 1e-9


def balanced_entropy(probs: torch.Tensor) -> torch.Tensor:
    """BalEnt (Woo, ICLR 2023): (MJEnt + log 2) / (H + log 2).

    Each class marginal P_c across the S samples is fitted by a Beta(a_c, b_c) by the method of
    moments (mean m_c, unbiased variance v_c: a_c = m_c (m_c (1 - m_c) / v_c - 1), b_c = a_c
    (1 - m_c) / m_c); P_c+ ~ Beta(a_c + 1, b_c) is the marginal given that class c was drawn; the
    marginalised joint entropy is MJEnt = sum_c m_c h(P_c+) + H, with h the differential entropy
    and H the predictive entropy H(mean_s p_s). The variance is clamped into
    [BETA_MIN_VARIANCE, m_c (1 - m_c)) so that identical samples and degenerate rows stay finite.

    Args:
        probs: (S, N, C) probabilities, S >= 2.

    Returns:
        (N,) BalEnt values, at most 1.
    """
    p = _check_probs(probs).double()
    if p.shape[0] < 2:
        raise SparsesegError(f"probs has S={p.shape[0]} samples; balanced entropy needs at least 2")
    eps = 1e-9
    m = p.mean(dim=0).clamp(eps, 1 - eps)
    v = p.var(dim=0, correction=1)
    v = torch.minimum(v.clamp(min=BETA_MIN_VARIANCE), m * (1 - m) * (1 - 1e-6))
    a = m * (m * (1 - m) / v - 1)
    b = a * (1 - m) / m
    mjent = (m * _beta_entropy(a + 1, b)).sum(dim=-1) + _entropy_last(p.mean(dim=0))
    h = _entropy_last(p.mean(dim=0))
    log2 = float(np.log(2.0))
    return ((mjent + log2) / (h + log2)).to(probs.dtype)


def balentacq(probs: torch.Tensor) -> torch.Tensor:
    """BalEntAcq: 1 / BalEnt where BalEnt >= 0, else BalEnt (higher = more informative).

    Pixels whose balanced entropy is just above 0 come first; negative ones rank below every
    non-negative one.

    Args:
        probs: (S, N, C) probabilities, S >= 2.

    Returns:
        (N,) scores.
    """
    bal = balanced_entropy(probs)
    return torch.where(bal >= 0, 1.0 / bal, bal)
