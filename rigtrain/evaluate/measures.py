"""Measures of a frozen encoder (docs/model.md, "Evaluation"): weighted kNN and a linear probe
per label, and text<->video retrieval, each beside its chance level. Pure functions of
feature arrays, so they are tested on hand-made features.

Chance, stated plainly: for a label it is what always guessing the most common held-out
class scores (never below 1/classes); for retrieval it is what a random ranking scores.
"""

from __future__ import annotations

import numpy as np
import torch


def majority_rate(labels: np.ndarray) -> float:
    """The accuracy of always guessing the most common class."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Weighted kNN (DINO's eval_knn): cosine similarity to the bank, the k nearest vote
    for their class with weight exp(similarity / T). bank (n, D), queries (m, D) -> (m,)."""
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    similarity, nearest = (queries @ bank.T).topk(min(k, len(bank)), dim=1)  # (m, k)
    votes = torch.zeros(len(queries), classes).scatter_add_(
        1, bank_labels[nearest].long(), (similarity / temperature).exp()
    )
    return votes.argmax(dim=1)


def linear_probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    *,
    classes: int,
    weight_decay: float = 1e-3,
    iterations: int = 100,
) -> torch.Tensor:
    """A softmax classifier on frozen features (standardised by the training set's mean and
    spread), fitted by full-batch L-BFGS with L2 decay; deterministic. -> test predictions."""
    train, test = train.double(), test.double()
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    x, y = (train - mean) / std, train_labels.long()
    layer = torch.nn.Linear(x.shape[1], classes, dtype=torch.float64)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return layer((test - mean) / std).argmax(dim=1)


def label_scores(
    bank: torch.Tensor,
    bank_labels: np.ndarray,
    queries: torch.Tensor,
    query_labels: np.ndarray,
    names: list[str],
    *,
    k: int,
    temperature: float,
) -> tuple[dict, dict]:
    """kNN and probe top-1 for one label, over clips that have it (label >= 0)."""
    in_bank, in_queries = bank_labels >= 0, query_labels >= 0
    if in_bank.sum() == 0 or in_queries.sum() == 0:
        return {}, {}
    b, bl = bank[torch.from_numpy(in_bank)], torch.from_numpy(bank_labels[in_bank].astype(np.int64))
    q, ql = queries[torch.from_numpy(in_queries)], query_labels[in_queries].astype(np.int64)
    common = {"chance": round(majority_rate(ql), 4), "classes": len(names), "clips": int(in_queries.sum())}
    knn = knn_predict(b, bl, q, classes=len(names), k=k, temperature=temperature).numpy()
    probe = linear_probe(b, bl, q, classes=len(names)).numpy()
    return (
        {"top1": round(float((knn == ql).mean()), 4), **common},
        {"top1": round(float((probe == ql).mean()), 4), **common},
    )


def expected_ranks(scores: torch.Tensor) -> torch.Tensor:
    """scores (n, n): query i against items, item i the right one -> (greater, ties): how
    many items score above the right one, and how many others score the same."""
    right = scores.diagonal()[:, None]
    others = ~torch.eye(len(scores), dtype=torch.bool)
    greater = ((scores > right) & others).sum(1)
    ties = ((scores == right) & others).sum(1)
    return torch.stack([greater, ties], dim=1)


def recall_at(ranks: torch.Tensor, k: int) -> float:
    """The chance that the right item is in the top k when ties are broken at random."""
    greater, ties = ranks[:, 0].double(), ranks[:, 1].double()
    p = ((k - greater) / (ties + 1)).clamp(0, 1)
    return float(p.mean())


def retrieval(queries: torch.Tensor, items: torch.Tensor) -> dict:
    """Query i's right item is item i (L2-normalised embeddings). R@1/5/10 and the median
    rank, ties broken at random (identical narrations tie exactly), beside chance."""
    n = len(queries)
    ranks = expected_ranks(queries.float() @ items.float().T)
    mean_rank = 1 + ranks[:, 0].double() + ranks[:, 1].double() / 2
    out = {
        "r1": recall_at(ranks, 1),
        "r5": recall_at(ranks, 5),
        "r10": recall_at(ranks, 10),
        "medr": float(np.median(mean_rank.numpy())),
        "chance_r1": 1 / n,
        "chance_r5": min(5, n) / n,
        "chance_r10": min(10, n) / n,
        "chance_medr": (n + 1) / 2,
        "clips": n,
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
