"""Evaluation: frozen-feature probes, i-MAE linear separability, Self-guided MAE patch-clustering metrics.

Every metric is first a function of tensors (features, labels, similarity or attention matrices) with a
known answer on hand-made inputs; the model-facing wrappers below them only collect those tensors from a
model (pooled features, per-layer patch features, attention maps recomputed from each block's qkv).
Definitions with formulas: docs/METRICS.md. The ``maskedssl evaluate`` subcommand is ``add_arguments`` +
``main`` at the bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import pathlib
import sys
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

MIX_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
METRICS = ("probe", "knn", "finetune", "separability", "clustering")


# --------------------------------------------------------------------------------------------------
# Frozen-feature probes
# --------------------------------------------------------------------------------------------------

def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """z-score every tensor with the train set's per-dimension mean and std.

    This is MAE's linear-probe BatchNorm without affine, frozen at the train statistics: it makes the
    probe's learning rate independent of the encoder's feature scale.
    """
    mean = train.mean(0, keepdim=True)
    std = train.std(0, unbiased=False, keepdim=True) + eps
    return [(t - mean) / std for t in (train, *others)]


def _check_features(name: str, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or not feats.is_floating_point():
        raise ValueError(f"{name}_feats must be a float (N, D) tensor")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != feats.shape[0]
                               or labels.is_floating_point()):
        raise ValueError(f"{name}_labels must be an integer (N,) tensor matching {name}_feats")


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 0.0,
                 batch_size: int = 1024, seed: int = 0) -> dict:
    """Multinomial logistic regression on standardised frozen features; accuracies are fractions in [0, 1].

    AdamW with a cosine learning-rate decay, minibatches of ``batch_size`` (full batch when the train set
    is smaller). Returns dict(acc=test accuracy, train_acc, loss=final train loss, num_classes).
    """
    _check_features("train", train_feats, train_labels)
    _check_features("test", test_feats, test_labels)
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError("train_feats and test_feats must have the same width D")
    gen = torch.Generator().manual_seed(seed)
    x_train, x_test = standardize(train_feats.float().cpu(), test_feats.float().cpu())
    y_train, y_test = train_labels.long().cpu(), test_labels.long().cpu()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    head = torch.nn.Linear(x_train.shape[1], num_classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for idx in order.split(batch_size):
                loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        train_acc = (head(x_train).argmax(1) == y_train).float().mean().item()
        acc = (head(x_test).argmax(1) == y_test).float().mean().item()
    return dict(acc=acc, train_acc=train_acc, loss=float(loss.detach()), num_classes=num_classes)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted k-NN accuracy (a fraction) with cosine similarity, as DINO evaluates it.

    Each of the k nearest train features votes for its label with weight exp(cos / temperature).
    """
    _check_features("train", train_feats, train_labels)
    _check_features("test", test_feats, test_labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.long().to(train.device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        pred = votes.argmax(1).cpu()
        correct += int((pred == test_labels[start:start + chunk].long().cpu()).sum())
    return correct / test.shape[0]


# --------------------------------------------------------------------------------------------------
# i-MAE linear separability
# --------------------------------------------------------------------------------------------------

def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression y ~ x W + b (float64). The penalty is ``ridge`` times the mean
    eigenvalue of the centred Gram matrix, so it does not depend on the feature scale."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                xc.T @ yc)
    return weight, y_mean - x_mean @ weight


def r2_score(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Pooled coefficient of determination 1 - sum (y - pred)^2 / sum (y - mean_y)^2 over every entry,
    with each column's own mean as the baseline."""
    y, pred = y.double(), pred.double()
    ss_res = (y - pred).square().sum()
    ss_tot = (y - y.mean(0, keepdim=True)).square().sum().clamp_min(1e-12)
    return float(1.0 - ss_res / ss_tot)


def separability_r2(train_mix: torch.Tensor, train_sub: torch.Tensor, train_dom: torch.Tensor,
                    test_mix: torch.Tensor, test_sub: torch.Tensor, test_dom: torch.Tensor,
                    ridge: float = 1e-3) -> dict:
    """Held-out R^2 of one ridge regression from f(mixture) to [f(sub), f(dom)].

    Inputs and targets are z-scored with the train statistics, so every feature dimension weighs the
    same in the pooled R^2. Returns dict(r2 (both targets), r2_sub, r2_dom).
    """
    for name, t in (("train_mix", train_mix), ("train_sub", train_sub), ("train_dom", train_dom),
                    ("test_mix", test_mix), ("test_sub", test_sub), ("test_dom", test_dom)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be (N, D), got {tuple(t.shape)}")
    d = train_sub.shape[1]
    x_train, x_test = standardize(train_mix.double(), test_mix.double())
    y_train, y_test = standardize(torch.cat([train_sub, train_dom], 1).double(),
                                  torch.cat([test_sub, test_dom], 1).double())
    weight, bias = ridge_fit(x_train, y_train, ridge)
    pred = x_test @ weight + bias
    return dict(r2=r2_score(y_test, pred), r2_sub=r2_score(y_test[:, :d], pred[:, :d]),
                r2_dom=r2_score(y_test[:, d:], pred[:, d:]))


def sample_other_class_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each sample, the index of a random sample of another class (any other sample when only one
    class is present), so that subordinate and dominant labels differ and their probes mean something."""
    n = labels.shape[0]
    partners = torch.empty(n, dtype=torch.long)
    for c in labels.unique():
        rows = (labels == c).nonzero().squeeze(1)
        pool = (labels != c).nonzero().squeeze(1)
        if pool.numel() == 0:
            pool = torch.arange(n)
        partners[rows] = pool[torch.randint(pool.numel(), (rows.numel(),), generator=generator)]
    return partners


# --------------------------------------------------------------------------------------------------
# Self-guided MAE: patch clustering, token relations, attention
# --------------------------------------------------------------------------------------------------

def cosine_similarity_matrix(feats: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine similarities of the patch features, in float32."""
    f = F.normalize(feats.float(), dim=-1)
    return f @ f.transpose(1, 2)


def feature_variance(feats: torch.Tensor) -> torch.Tensor:
    """sigma_F per image (B,): total variance of the L2-normalised patch features around their mean,
    sum_d Var_i(f_id) = 1 - ||mean_i f_i||^2, in [0, 1]."""
    f = F.normalize(feats.float(), dim=-1)
    return (f - f.mean(1, keepdim=True)).square().sum(-1).mean(1)


def _off_diagonal(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def similarity_variance(feats: torch.Tensor) -> torch.Tensor:
    """sigma_s per image (B,): population variance of the off-diagonal pairwise cosine similarities."""
    sim = cosine_similarity_matrix(feats)
    values = sim[:, _off_diagonal(sim.shape[1], sim.device)]
    return values.var(1, unbiased=False)


def intra_inter_gap(similarity: torch.Tensor, partition: torch.Tensor) -> dict:
    """mu_intra - mu_inter of a bi-partition: mean edge weight between distinct patches on the same side
    minus the mean between the two sides. similarity (B, N, N), partition (B, N) bool.

    Returns dict(intra, inter, gap), each (B,); an image whose partition has an empty side gets NaN inter
    and gap.
    """
    if similarity.ndim != 3 or similarity.shape[1] != similarity.shape[2]:
        raise ValueError(f"similarity must be (B, N, N), got {tuple(similarity.shape)}")
    if partition.shape != similarity.shape[:2] or partition.dtype != torch.bool:
        raise ValueError("partition must be a bool (B, N) tensor matching similarity")
    sim = similarity.float()
    same = partition.unsqueeze(2) == partition.unsqueeze(1)
    off = _off_diagonal(sim.shape[1], sim.device)
    intra_mask, inter_mask = (same & off).float(), (~same).float()
    intra = (sim * intra_mask).sum((1, 2)) / intra_mask.sum((1, 2))
    inter = (sim * inter_mask).sum((1, 2)) / inter_mask.sum((1, 2))
    return dict(intra=intra, inter=inter, gap=intra - inter)


def token_relations(feats: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) row-stochastic token relations: row i is softmax_j(cos(f_i, f_j) / T) over
    the other tokens j != i (a token's similarity to itself is always 1 and would swamp the row)."""
    sim = cosine_similarity_matrix(feats) / temperature
    sim = sim.masked_fill(~_off_diagonal(sim.shape[1], sim.device), float("-inf"))
    return sim.softmax(-1)


def relation_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) of row-stochastic relations (..., N, N), summed over each row, averaged over rows:
    returns (...,) e.g. (B,). Entries where p = 0 contribute 0."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    p, q = p.double(), q.double()
    kl = torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(eps))
    return kl.sum(-1).mean(-1)


def exploitation_rates(attn: torch.Tensor, mask: torch.Tensor, num_prefix: int = 1) -> dict:
    """How much the mask tokens' queries draw from visible vs mask tokens in one decoder layer.

    attn: (B, H, T, T) softmax attention with ``num_prefix`` leading non-patch tokens (the cls token)
    followed by the L patch tokens in image order; mask: (B, L), 1 = masked. Returns floats
    dict(visible, mask, prefix): the attention mass of a mask-token query on visible patch keys, on
    mask-token keys and on the prefix tokens, averaged over mask-token queries, heads and images
    (the three sum to 1).
    """
    b, h, t, _ = attn.shape
    if mask.shape != (b, t - num_prefix):
        raise ValueError(f"mask must be (B, L) = ({b}, {t - num_prefix}), got {tuple(mask.shape)}")
    masked = mask.bool()
    patch_attn = attn[:, :, num_prefix:, :].float()  # queries: patch tokens only
    prefix = patch_attn[..., :num_prefix].sum(-1)
    keys = patch_attn[..., num_prefix:]
    on_mask = (keys * masked[:, None, None, :]).sum(-1)
    on_visible = keys.sum(-1) - on_mask
    weight = masked[:, None, :].float().expand(b, h, -1)
    count = weight.sum().clamp_min(1)
    return dict(visible=float((on_visible * weight).sum() / count), mask=float((on_mask * weight).sum() / count),
                prefix=float((prefix * weight).sum() / count))


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int = 1,
                       num_prefix: int = 1) -> torch.Tensor:
    """Mean attention distance per head (H,), in pixels: sum_j a_ij ||p_i - p_j|| averaged over patch
    queries i and images, where p are patch centres and a is the attention among patch tokens only
    (the prefix row and columns dropped, each row renormalised to sum 1)."""
    h_grid, w_grid = grid
    patch_attn = attn[:, :, num_prefix:, num_prefix:].float()
    if patch_attn.shape[-1] != h_grid * w_grid:
        raise ValueError(f"attn has {patch_attn.shape[-1]} patch tokens, grid {grid} needs {h_grid * w_grid}")
    patch_attn = patch_attn / patch_attn.sum(-1, keepdim=True).clamp_min(1e-12)
    ys, xs = torch.meshgrid(torch.arange(h_grid), torch.arange(w_grid), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], 1).float().to(attn.device) * patch_size
    dist = torch.cdist(centres, centres)
    return (patch_attn * dist).sum(-1).mean((0, 2))


def patch_object_mask(object_mask: torch.Tensor, patch_size: int, threshold: float = 0.5) -> torch.Tensor:
    """Pixel object masks (B, H, W) or (H, W) -> (B, L) bool: a patch is object when more than
    ``threshold`` of its pixels are."""
    m = object_mask.float()
    if m.ndim == 2:
        m = m.unsqueeze(0)
    frac = F.avg_pool2d(m.unsqueeze(1), patch_size).flatten(1)
    return frac > threshold


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU |pred & target| / |pred | target| per row of two (B, L) bool masks (1 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
