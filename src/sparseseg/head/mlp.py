"""The pixel classifier: the paper's MLP head (as in LEDM), its training and its prediction.

Only the labelled pixels' features are needed to train it, and they are extracted once per round
(the reference code re-ran the UNet on whole images every batch of every epoch).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from sparseseg.config import HeadConfig
from sparseseg.seeding import derived_seed


def default_hidden(num_classes: int) -> tuple[int, int]:
    """(128, 32) under 30 classes, (256, 128) otherwise (paper, appendix B.3)."""
    return (128, 32) if num_classes < 30 else (256, 128)


def make_head(dim: int, num_classes: int, hidden: tuple[int, ...] | None = None,
              dropout: float = 0.0) -> nn.Sequential:
    """MLP dim -> h1 -> h2 -> C with ReLU then BatchNorm after each hidden layer; returns logits.

    With `dropout` > 0 a Dropout follows each hidden block (not in the paper's head; it is what
    MC-dropout scores such as BALD sample from, see `mc_dropout_proba`).
    """
    layers: list[nn.Module] = []
    width = dim
    for h in hidden or default_hidden(num_classes):
        layers += [nn.Linear(width, h), nn.ReLU(), nn.BatchNorm1d(h)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def balanced_weights(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel loss weights under which every class present weighs the same in total.

    A pixel of class c gets w_i * W / (K * W_c), where w_i is its own weight (1 when `weights` is
    None), W_c the total weight of class c, W the total of all and K the number of classes present:
    the total stays W, and mIoU's rare classes are no longer drowned by road and sky.

    Args:
        labels: (n,) class ids.
        weights: (n,) non-negative weights, or None.
    """
    w = torch.ones(len(labels)) if weights is None else weights.float()
    classes, index = torch.unique(labels, return_inverse=True)
    per_class = torch.zeros(len(classes)).index_add_(0, index, w)
    return w * w.sum() / (len(classes) * per_class[index])


class HeadEnsemble(nn.Module):
    """Several heads trained from different seeds; the prediction is the mean of their probabilities.

    `forward` returns the log of that mean, so `predict_proba` (a softmax of the output) gives the
    mean probabilities and argmax the ensemble's class, wherever a single head is used.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def build_head(dim: int, num_classes: int, config: HeadConfig) -> nn.Module:
    """An untrained head as `config` describes it: one MLP, or a `HeadEnsemble` of `config.ensemble` MLPs
    (for loading saved weights)."""
    members = [make_head(dim, num_classes, config.hidden, config.dropout) for _ in range(config.ensemble)]
    return members[0] if config.ensemble == 1 else HeadEnsemble(members)


def member_seed(seed: int, member: int) -> int:
    """Member 0 of an ensemble takes the head's own seed, so an ensemble of one is the single head."""
    return seed if member == 0 else derived_seed(seed, "member", member)


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: HeadConfig,
    seed: int,
    device: str | torch.device = "cpu",
    weights: torch.Tensor | None = None,
) -> nn.Sequential:
    """Train a fresh head on labelled pixels with cross-entropy.

    Adam (lr 1e-3, weight decay 1e-5) and cosine annealing (T_max 5, eta_min 1e-6) stepped per
    epoch, as in the paper; early stop once the loss has not improved for `patience` iterations
    while training accuracy is above `target_accuracy` (paper, Sec. 4.2).

    Args:
        features: (n, D) float features of the labelled pixels.
        labels: (n,) class ids in [0, C).
        seed: fixes initialisation and batch order, so a round can be replayed exactly.
        weights: (n,) non-negative per-pixel loss weights, or None (every pixel alike: the plain mean
            cross-entropy, the paper's loss). With weights, a batch's loss is sum(w_i * CE_i) / sum(w_i),
            so SAM region pixels can share one click's weight (docs/expansion.md).

    Returns:
        The trained head in eval mode, on `device`: one MLP, or with `config.ensemble` > 1 a
        `HeadEnsemble` whose member i is trained with `member_seed(seed, i)`.
    """
    # One thread: a multi-threaded CPU BLAS may split sums differently under load, and a replayed
    # round must train the same head bit for bit. The head is small; one thread costs little.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        members = [_train(features, labels, num_classes, config, member_seed(seed, i), device, weights)
                   for i in range(config.ensemble)]
    finally:
        torch.set_num_threads(threads)
    return members[0] if config.ensemble == 1 else HeadEnsemble(members).eval()


def _train(features, labels, num_classes, config, seed, device, weights=None) -> nn.Sequential:
    if len(labels) == 0:
        raise ValueError("train_head needs at least one labelled pixel")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"train_head: weights of shape {tuple(weights.shape)} for {len(labels)} labels")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(features.shape[1], num_classes, config.hidden, config.dropout).to(device)
    # BatchNorm needs two samples in a batch: with a single labelled pixel, show it twice.
    if len(labels) == 1:
        features, labels = features.repeat(2, 1), labels.repeat(2)
        weights = weights.repeat(2) if weights is not None else None
    x, y = features.to(device), labels.to(device).long()
    w = weights.to(device, torch.float32) if weights is not None else None
    per_pixel = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.t_max, eta_min=config.eta_min)
    loss_fn = nn.CrossEntropyLoss()
    best, since_best = float("inf"), 0
    head.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=gen).to(device)
        batches = list(torch.split(perm, config.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:  # a batch of one breaks BatchNorm
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        for idx in batches:
            logits = head(x[idx])
            if w is None:
                loss = loss_fn(logits, y[idx])
            else:  # weighted mean; a batch of zero weights (never with clicks present) contributes nothing
                loss = (per_pixel(logits, y[idx]) * w[idx]).sum() / w[idx].sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            accuracy = (logits.argmax(1) == y[idx]).float().mean().item()
            if loss.item() < best - 1e-6:
                best, since_best = loss.item(), 0
            else:
                since_best += 1
            if since_best >= config.patience and accuracy > config.target_accuracy:
                return head.eval()
        sched.step()
    return head.eval()


@torch.no_grad()
def predict_proba(head: nn.Module, features: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """Softmax probabilities (n, C) for features (n, D), in batches, head in eval mode."""
    device = next(head.parameters()).device
    out = [torch.softmax(head(chunk.to(device)).float(), dim=1).cpu() for chunk in torch.split(features, batch)]
    return torch.cat(out) if out else torch.empty(0, num_classes_of(head))


def num_classes_of(head: nn.Module) -> int:
    """The number of classes a head predicts (its last linear layer's outputs)."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features


def has_dropout(head: nn.Module) -> bool:
    """Whether the head has Dropout layers to sample from."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in head.modules())


def head_samples(config: HeadConfig) -> int:
    """How many different probability samples a head trained with `config` can give BALD-type scores:
    its members (an ensemble), unbounded (MC dropout: sys.maxsize), or 0."""
    if config.ensemble > 1:
        return config.ensemble
    return sys.maxsize if config.dropout > 0 else 0


@torch.no_grad()
def member_proba(head: HeadEnsemble, features: torch.Tensor, members: int, batch: int = 65536) -> torch.Tensor:
    """Softmax probabilities of the first `members` members of an ensemble: (members, n, C)."""
    if members > len(head.members):
        raise ValueError(f"{members} samples asked of an ensemble of {len(head.members)} heads")
    device = next(head.parameters()).device
    return torch.stack([
        torch.cat([torch.softmax(m(chunk.to(device)).float(), dim=1).cpu() for chunk in torch.split(features, batch)])
        if len(features) else torch.empty(0, m[-1].out_features)
        for m in list(head.members)[:members]
    ])


@torch.no_grad()
def mc_dropout_proba(head: nn.Module, features: torch.Tensor, passes: int, seed: int,
                     batch: int = 65536) -> torch.Tensor:
    """Softmax probabilities of `passes` stochastic forward passes: (passes, n, C).

    Dropout is switched on and BatchNorm stays in eval mode (its running statistics), so only
    the dropout masks differ between passes. The masks come from a private RNG seeded by `seed`,
    so the same call gives the same samples and the global RNG is left untouched.
    """
    device = next(head.parameters()).device
    dropouts = [m for m in head.modules() if isinstance(m, nn.Dropout)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for m in dropouts:
            m.train()
        try:
            out = torch.stack([
                torch.cat([torch.softmax(head(chunk.to(device)).float(), dim=1).cpu()
                           for chunk in torch.split(features, batch)])
                if len(features) else torch.empty(0, num_classes_of(head))
                for _ in range(passes)
            ])
        finally:
            for m in dropouts:
                m.eval()
    return out
