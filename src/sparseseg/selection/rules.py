"""Turning scores into picks: top-b, power sampling, the PixelPick rule, all streamable.

Every rule is "the b largest keys", with keys computed per chunk of pixels, so the candidates can
be streamed (every pixel of every image) while only the best b (or the top fraction) are kept:

* top-b: key = score. Ties keep the earlier pixel (stable order).
* power sampling (PowerBALD, Kirsch et al. 2022): draw b pixels without replacement with
  p(i) proportional to score_i ** power. With Gumbel noise g_i, the b largest of
  power * log(score_i) + g_i are exactly such a draw (the Gumbel-top-k trick), so it streams too.
  Pixels with score 0 get key -inf and come last.
* PixelPick (Shin et al. 2021): keep the top `fraction` of pixels by score, then draw b of them
  uniformly (seeded).
* class-balanced top-b (`balanced_top`): the b picks spread evenly over the classes the head
  predicts, best score first within each class (not streamed: it runs on the coverage pool).
"""

from __future__ import annotations

import math

import torch

from sparseseg.errors import SparsesegError


def power_keys(scores: torch.Tensor, power: float, generator: torch.Generator) -> torch.Tensor:
    """Gumbel-perturbed log-scores whose top-b is a power-sampling draw without replacement."""
    if bool((scores < 0).any()):
        raise SparsesegError("power sampling needs non-negative scores (BALD/DALD mutual information)")
    u = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
    with torch.no_grad():
        log_scores = torch.log(scores.double())  # log 0 = -inf: never preferred to a positive score
    return power * log_scores + gumbel


def power_distribution(scores: torch.Tensor, power: float) -> torch.Tensor:
    """The distribution power sampling draws from: score ** power, normalised."""
    p = scores.double() ** power
    return p / p.sum()


class TopK:
    """The k largest keys seen so far, with their payload rows; ties keep the earlier item.

    Memory is O(k) whatever the number of chunks pushed. The kept entries are stored best first
    with ties in arrival order and every new chunk arrives after them, so one stable descending
    sort of [kept, new] keeps ties in arrival order.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = torch.empty(0, dtype=torch.float64)
        self.items: torch.Tensor | None = None

    def push(self, keys: torch.Tensor, items: torch.Tensor) -> None:
        """Offer a chunk: keys (n,), items (n, P) long (for example image, y, x)."""
        all_keys = torch.cat([self.keys, keys.double()])
        all_items = items.long() if self.items is None else torch.cat([self.items, items.long()])
        keep = torch.argsort(all_keys, descending=True, stable=True)[: self.k]
        self.keys, self.items = all_keys[keep], all_items[keep]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, items) of the kept entries, best first."""
        items = self.items if self.items is not None else torch.empty(0, 1, dtype=torch.long)
        return self.keys, items


def top_fraction_count(total: int, fraction: float, budget: int) -> int:
    """How many pixels the PixelPick rule keeps before its random draw (at least the budget)."""
    return min(total, max(budget, math.ceil(fraction * total)))


def balanced_top(scores: torch.Tensor, classes: torch.Tensor, budget: int) -> torch.Tensor:
    """Round-robin over predicted classes: the best item of every class, then the second best, ...

    Within a round of the robin, classes are taken in the order of that round's items' scores, so
    with one class this is plain top-b. Ties keep the earlier item. Equivalently: sort the items by
    (rank within their class, -score, index) and take the first b.

    Args:
        scores: (n,) higher = more informative.
        classes: (n,) the class each item is predicted to be.
        budget: b <= n.

    Returns:
        (b,) indices into the items, in pick order.
    """
    n = len(scores)
    if budget > n:
        raise SparsesegError(f"budget {budget} is larger than the {n} candidates")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.long)
    seen: dict[int, int] = {}
    for i, c in zip(order.tolist(), classes[order].tolist(), strict=True):
        rank[i] = seen.get(c, 0)
        seen[c] = rank[i].item() + 1
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    key = rank * n + position  # rank first, then the score order (which already breaks ties by index)
    return torch.argsort(key)[:budget]
