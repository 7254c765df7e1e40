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

from .ops._validate import REFERENCE_DTYPES, check_positive_int, check_tensor

MIX_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
METRICS = ("probe", "knn", "finetune", "separability", "clustering")


# --------------------------------------------------------------------------------------------------
# Frozen-feature probes
# --------------------------------------------------------------------------------------------------

def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """z-score every tensor with the train set's per-dimension mean and std (+ ``eps``), in its dtype.

    The role of MAE's linear-probe BatchNorm without affine, frozen at the train statistics: it makes the
    probe's learning rate independent of the encoder's feature scale. A dimension constant on the train
    set (spread below 1e-5 of its mean: rounding) is set to 0 everywhere: nothing can be learnt from it,
    and dividing by its zero spread would multiply any test variation by 1 / eps.
    """
    mean = train.double().mean(0, keepdim=True)
    var = train.double().var(0, unbiased=False, keepdim=True)
    scale = torch.where(var <= 1e-10 * mean.square(), 0.0, 1.0 / (var.sqrt() + eps))
    return [((t.double() - mean) * scale).to(t.dtype) for t in (train, *others)]


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0 <= value if allow_zero else 0 < value) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'} and finite, got {value}")
    return float(value)


class DTypeError(TypeError, ValueError):
    """A tensor of the wrong dtype: a TypeError, as the ops and the patch metrics raise for one, and a
    ValueError, as the probe and separability checks raised before they told the two apart."""


def _check_float_matrix(name: str, t) -> None:
    """``t`` is a float (N, D) tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a float (N, D) tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a float (N, D) tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be a float (N, D) tensor, got shape {tuple(t.shape)}")


def _check_features(name: str, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    _check_float_matrix(f"{name}_feats", feats)
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}_labels must be an integer (N,) tensor, got {type(labels).__name__}")
    if feats.shape[0] == 0:
        raise ValueError(f"{name}_feats holds no samples (N = 0)")
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        raise DTypeError(f"{name}_labels must be an integer (N,) tensor of class ids, got {labels.dtype}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != feats.shape[0]):
        raise ValueError(f"{name}_labels must be an integer (N,) tensor matching {name}_feats")
    if labels is not None and int(labels.min()) < 0:  # class ids index the logits / vote columns
        raise ValueError(f"{name}_labels must be class ids >= 0, found {int(labels.min())}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{name}_feats must be finite: found NaN or inf")


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
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
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
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError("train_feats and test_feats must have the same width D")
    check_positive_int("k", k)
    check_positive_int("chunk", chunk)
    _check_positive("temperature", temperature)  # exp(cos / 0) is inf for every neighbour: the votes tie
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.long().to(train.device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=train.device)
        # relative to each row's nearest (topk sorts): the same vote ratios, without exp overflowing to
        # inf (and every vote tying) once 1 / temperature passes ~88
        votes.scatter_add_(1, train_labels[idx], ((sims - sims[:, :1]) / temperature).exp())
        pred = votes.argmax(1).cpu()
        correct += int((pred == test_labels[start:start + chunk].long().cpu()).sum())
    return correct / test.shape[0]


# --------------------------------------------------------------------------------------------------
# i-MAE linear separability
# --------------------------------------------------------------------------------------------------

def _check_regression_pair(x_name: str, x, y_name: str, y, same_width: bool = False) -> None:
    """Two float (N, D) tensors with the same N >= 1 (and the same D with ``same_width``)."""
    for name, t in ((x_name, x), (y_name, y)):
        check_tensor(name, t, ndim=2, dtypes=REFERENCE_DTYPES, what="(N, D)")
        if t.shape[0] == 0:
            raise ValueError(f"{name} holds no rows (N = 0)")
    if x.shape[0] != y.shape[0] or (same_width and x.shape != y.shape):
        what = "shape" if same_width else "number of rows"
        raise ValueError(f"{x_name} and {y_name} must have the same {what}, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression y ~ x W + b (float64), x (N, Dx), y (N, Dy). The penalty is ``ridge``
    (>= 0) times the mean eigenvalue of the centred Gram matrix, so it does not depend on the feature
    scale."""
    _check_regression_pair("x", x, "y", y)
    _check_positive("ridge", ridge, allow_zero=True)
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
    with each column's own mean as the baseline.

    Targets without variance (one sample, constant columns) leave the ratio undefined; as scikit-learn's
    ``r2_score`` does then, the score is 1 for an exact prediction and 0 otherwise (dividing by a
    clamped zero gave values like -1e13). ``y`` and ``pred``: float (N, D) or (N,) tensors of one shape
    (a shape mismatch is an error, not a broadcast)."""
    if isinstance(y, torch.Tensor) and isinstance(pred, torch.Tensor) and y.ndim == pred.ndim == 1:
        y, pred = y.unsqueeze(1), pred.unsqueeze(1)
    _check_regression_pair("y", y, "pred", pred, same_width=True)
    y, pred = y.double(), pred.double()
    ss_res = (y - pred).square().sum()
    ss_tot = (y - y.mean(0, keepdim=True)).square().sum()
    # relative to the targets' size: the mean of equal values can differ from them by a rounding error
    if ss_tot <= 1e-24 * y.square().sum():
        return 1.0 if ss_res <= 1e-24 * y.square().sum() else 0.0
    return float(1.0 - ss_res / ss_tot)


RIDGE_GRID = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def select_ridge(x: torch.Tensor, y: torch.Tensor, grid: Sequence[float] = RIDGE_GRID,
                 val_frac: float = 0.25) -> float:
    """The ridge strength of ``grid`` with the best R^2 on a random ``val_frac`` of the train pairs
    (at least one, at most all but one; 2 pairs or more), fitted on the rest: few pairs and wide
    features overfit at a fixed small penalty. On a fixed validation set the best R^2 is the least
    squared error, which is also defined for one validation pair (R^2 is not); ties go to the first."""
    _check_regression_pair("x", x, "y", y)
    if x.shape[0] < 2:
        raise ValueError(f"select_ridge needs at least 2 pairs (one to fit, one to validate), "
                         f"got {x.shape[0]}")
    grid = [_check_positive("grid values", r) for r in grid]
    if not grid:
        raise ValueError("grid must hold at least one ridge strength")
    if isinstance(val_frac, bool) or not isinstance(val_frac, (int, float)) or not 0 < val_frac < 1:
        raise ValueError(f"val_frac must be a number in (0, 1), got {val_frac!r}")
    n_val = min(max(1, int(x.shape[0] * val_frac)), x.shape[0] - 1)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0)).to(x.device)
    val, fit = order[:n_val], order[n_val:]
    fit_x, val_x, fit_y, val_y = x[fit], x[val], y[fit], y[val].double()
    errors = []
    for r in grid:
        weight, bias = ridge_fit(fit_x, fit_y, r)
        errors.append(float((val_y - (val_x.double() @ weight + bias)).square().sum()))
    return grid[min(range(len(grid)), key=errors.__getitem__)]


def separability_r2(train_mix: torch.Tensor, train_sub: torch.Tensor, train_dom: torch.Tensor,
                    test_mix: torch.Tensor, test_sub: torch.Tensor, test_dom: torch.Tensor,
                    ridge: float | str = "auto") -> dict:
    """Held-out R^2 of one ridge regression from f(mixture) to [f(sub), f(dom)].

    Inputs and targets are z-scored with the train statistics, so every feature dimension weighs the
    same in the pooled R^2. ``ridge``: a relative penalty, or "auto" to pick it from ``RIDGE_GRID`` on a
    validation part of the train pairs (``select_ridge``; with one train pair "auto" is 1e-3, ``ridge_fit``'s
    default). Returns dict(r2 (both targets), r2_sub, r2_dom, ridge). Every input must be finite; with fewer
    than ~3 train pairs the numbers are defined but not meaningful.
    """
    named = {"train_mix": train_mix, "train_sub": train_sub, "train_dom": train_dom, "test_mix": test_mix,
             "test_sub": test_sub, "test_dom": test_dom}
    for name, t in named.items():
        _check_float_matrix(name, t)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
    for split in ("train", "test"):
        rows = {named[f"{split}_{part}"].shape[0] for part in ("mix", "sub", "dom")}
        if len(rows) > 1:
            raise ValueError(f"{split}_mix, {split}_sub and {split}_dom must hold the same pairs (rows), got "
                             f"{[named[f'{split}_{part}'].shape[0] for part in ('mix', 'sub', 'dom')]}")
        if rows.pop() == 0:
            raise ValueError(f"{split}_mix holds no pairs (N = 0)")
    for part in ("mix", "sub", "dom"):
        if named[f"train_{part}"].shape[1] != named[f"test_{part}"].shape[1]:
            raise ValueError(f"train_{part} and test_{part} must have the same width D, got "
                             f"{named[f'train_{part}'].shape[1]} and {named[f'test_{part}'].shape[1]}")
    # (a zero penalty is plain least squares: singular for constant features or fewer pairs than widths)
    if isinstance(ridge, str):
        if ridge != "auto":
            raise ValueError(f"ridge must be 'auto' or a number > 0, got {ridge!r}")
    elif isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be 'auto' or a number > 0, got {type(ridge).__name__}")
    elif not 0 < ridge < math.inf:
        raise ValueError(f"ridge must be 'auto' or a finite number > 0 (1e-9: nearly least squares), "
                         f"got {ridge}")
    d = train_sub.shape[1]
    x_train, x_test = standardize(train_mix.double(), test_mix.double())
    y_train, y_test = standardize(torch.cat([train_sub, train_dom], 1).double(),
                                  torch.cat([test_sub, test_dom], 1).double())
    if ridge == "auto":
        ridge = select_ridge(x_train, y_train) if x_train.shape[0] >= 2 else 1e-3
    weight, bias = ridge_fit(x_train, y_train, ridge)
    pred = x_test @ weight + bias
    return dict(r2=r2_score(y_test, pred), r2_sub=r2_score(y_test[:, :d], pred[:, :d]),
                r2_dom=r2_score(y_test[:, d:], pred[:, d:]), ridge=float(ridge))


def sample_other_class_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each sample, the index of a random sample of another class (any other sample when only one
    class is present), so that subordinate and dominant labels differ and their probes mean something."""
    n = labels.shape[0]
    partners = torch.empty(n, dtype=torch.long)
    if labels.unique().numel() == 1:
        if n == 1:
            return torch.zeros(1, dtype=torch.long)
        # a draw from the n - 1 others: skip over the row itself (a self-pair mixes an image with itself)
        draw = torch.randint(n - 1, (n,), generator=generator)
        return draw + (draw >= torch.arange(n)).long()
    for c in labels.unique():
        rows = (labels == c).nonzero().squeeze(1)
        pool = (labels != c).nonzero().squeeze(1)
        partners[rows] = pool[torch.randint(pool.numel(), (rows.numel(),), generator=generator)]
    return partners


# --------------------------------------------------------------------------------------------------
# Self-guided MAE: patch clustering, token relations, attention
# --------------------------------------------------------------------------------------------------

def _check_patch_features(feats, min_patches: int = 1) -> None:
    """``feats`` is a float (B, N, D) tensor of patch features with N >= ``min_patches``."""
    check_tensor("feats", feats, ndim=3, dtypes=REFERENCE_DTYPES, what="(B, N, D) patch features")
    if feats.shape[1] < min_patches:
        raise ValueError(f"feats must hold at least {min_patches} patches per image, "
                         f"got N = {feats.shape[1]}")
    if not bool(torch.isfinite(feats).all()):  # a NaN would spread through every mean of the image
        raise ValueError("feats must be finite: found NaN or inf")


def _check_attention(attn, num_prefix: int) -> None:
    """``attn`` is a float (B, H, T, T) attention map whose first ``num_prefix`` tokens are not patches."""
    check_tensor("attn", attn, ndim=4, dtypes=REFERENCE_DTYPES, what="(B, H, T, T) attention")
    if attn.shape[2] != attn.shape[3]:
        raise ValueError(f"attn must be square over tokens (B, H, T, T), got {tuple(attn.shape)}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int):
        raise TypeError(f"num_prefix must be an int, got {type(num_prefix).__name__}")
    if not 0 <= num_prefix < attn.shape[2]:
        raise ValueError(f"num_prefix must be in [0, T = {attn.shape[2]}), got {num_prefix}")


def cosine_similarity_matrix(feats: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine similarities of the patch features, in float32."""
    _check_patch_features(feats)
    f = F.normalize(feats.float(), dim=-1)
    return f @ f.transpose(1, 2)


def feature_variance(feats: torch.Tensor) -> torch.Tensor:
    """sigma_F per image (B,): total variance of the L2-normalised patch features around their mean,
    sum_d Var_i(f_id) = 1 - ||mean_i f_i||^2, in [0, 1] (a zero feature stays zero when normalised, so with
    zero patches the identity's 1 becomes the share of nonzero patches)."""
    _check_patch_features(feats)
    f = F.normalize(feats.float(), dim=-1)
    return (f - f.mean(1, keepdim=True)).square().sum(-1).mean(1)


def _off_diagonal(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def similarity_variance(feats: torch.Tensor) -> torch.Tensor:
    """sigma_s per image (B,): population variance of the off-diagonal pairwise cosine similarities
    (N >= 2 patches: one patch has no pair)."""
    _check_patch_features(feats, min_patches=2)
    sim = cosine_similarity_matrix(feats)
    values = sim[:, _off_diagonal(sim.shape[1], sim.device)]
    return values.var(1, unbiased=False)


def intra_inter_gap(similarity: torch.Tensor, partition: torch.Tensor) -> dict:
    """mu_intra - mu_inter of a bi-partition: mean edge weight between distinct patches on the same side
    minus the mean between the two sides. similarity (B, N, N), partition (B, N) bool.

    Returns dict(intra, inter, gap), each (B,); an image whose partition has an empty side gets NaN inter
    and gap, one where no two patches share a side (N = 2, split 1 / 1) NaN intra and gap.
    """
    check_tensor("similarity", similarity, ndim=3, dtypes=REFERENCE_DTYPES, what="(B, N, N)")
    check_tensor("partition", partition, ndim=2, what="bool (B, N)")
    if similarity.shape[1] != similarity.shape[2]:
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
    the other tokens j != i (a token's similarity to itself is always 1 and would swamp the row); N >= 2."""
    _check_patch_features(feats, min_patches=2)
    sim = cosine_similarity_matrix(feats) / _check_positive("temperature", temperature)
    sim = sim.masked_fill(~_off_diagonal(sim.shape[1], sim.device), float("-inf"))
    return sim.softmax(-1)


def relation_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) of row-stochastic relations (..., N, N), summed over each row, averaged over rows:
    returns (...,) e.g. (B,). Entries where p = 0 contribute 0."""
    check_tensor("p", p, dtypes=REFERENCE_DTYPES)
    check_tensor("q", q, dtypes=REFERENCE_DTYPES)
    if p.ndim < 2:  # rows of distributions: (N, N) relations, or any (..., rows, entries)
        raise ValueError(f"p must be (..., N, N) relations, got shape {tuple(p.shape)}")
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
    (the three sum to 1; NaN when no patch is masked).
    """
    _check_attention(attn, num_prefix)
    check_tensor("mask", mask, ndim=2, what="(B, L)")
    b, h, t, _ = attn.shape
    if mask.shape != (b, t - num_prefix):
        raise ValueError(f"mask must be (B, L) = ({b}, {t - num_prefix}), got {tuple(mask.shape)}")
    masked = mask.bool()
    if not bool(masked.any()):  # no mask-token query to measure (a model with mask_ratio 0)
        return dict(visible=math.nan, mask=math.nan, prefix=math.nan)
    patch_attn = attn[:, :, num_prefix:, :].float()  # queries: patch tokens only
    prefix = patch_attn[..., :num_prefix].sum(-1)
    keys = patch_attn[..., num_prefix:]
    on_mask = (keys * masked[:, None, None, :]).sum(-1)
    on_visible = keys.sum(-1) - on_mask
    weight = masked[:, None, :].float().expand(b, h, -1)
    count = weight.sum()
    def rate(mass):
        return float((mass * weight).sum() / count)

    return dict(visible=rate(on_visible), mask=rate(on_mask), prefix=rate(prefix))


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int = 1,
                       num_prefix: int = 1) -> torch.Tensor:
    """Mean attention distance per head (H,), in pixels: sum_j a_ij ||p_i - p_j|| averaged over patch
    queries i and images, where p are patch centres and a is the attention among patch tokens only
    (the prefix row and columns dropped, each row renormalised to sum 1). ``grid``: the (rows, columns)
    of patches. A query with no attention left on patches (all of it on the prefix) has no distance and
    is left out of the mean; a head where every query is so gets NaN."""
    _check_attention(attn, num_prefix)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid must be (rows, columns) of positive ints, got {grid!r}")
    h_grid, w_grid = grid
    _check_positive("patch_size", patch_size)
    patch_attn = attn[:, :, num_prefix:, num_prefix:].float()
    if patch_attn.shape[-1] != h_grid * w_grid:
        raise ValueError(f"attn has {patch_attn.shape[-1]} patch tokens, grid {grid} needs {h_grid * w_grid}")
    mass = patch_attn.sum(-1)
    patch_attn = patch_attn / mass.unsqueeze(-1).clamp_min(1e-12)
    ys, xs = torch.meshgrid(torch.arange(h_grid), torch.arange(w_grid), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], 1).float().to(attn.device) * patch_size
    dist = torch.cdist(centres, centres)
    counted = (mass > 0).float()
    return ((patch_attn * dist).sum(-1) * counted).sum((0, 2)) / counted.sum((0, 2))


def patch_object_mask(object_mask: torch.Tensor, patch_size: int, threshold: float = 0.5) -> torch.Tensor:
    """Pixel object masks (B, H, W) or (H, W) -> (B, L) bool: a patch is object when more than
    ``threshold`` of its pixels are (``threshold`` in [0, 1)). Bool or integer masks count every nonzero
    pixel as object (a 0/255 PNG mask too); float masks are soft, with values in [0, 1]."""
    check_positive_int("patch_size", patch_size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if not 0 <= threshold < 1:  # "more than 1" of the pixels: no patch could be object
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if not isinstance(object_mask, torch.Tensor):
        raise TypeError(f"object_mask must be a tensor, got {type(object_mask).__name__}")
    if object_mask.ndim not in (2, 3):
        raise ValueError(f"object_mask must be (B, H, W) or (H, W), got shape {tuple(object_mask.shape)}")
    if object_mask.shape[-2] % patch_size or object_mask.shape[-1] % patch_size:
        raise ValueError(f"object_mask's size {tuple(object_mask.shape[-2:])} is not divisible by patch_size "
                         f"{patch_size}")
    if object_mask.is_floating_point():
        if not bool(((object_mask >= 0) & (object_mask <= 1)).all()):  # NaN fails too
            raise ValueError("a float object_mask must hold values in [0, 1]")
        m = object_mask.float()
    else:
        m = (object_mask != 0).float()
    if m.ndim == 2:
        m = m.unsqueeze(0)
    frac = F.avg_pool2d(m.unsqueeze(1), patch_size).flatten(1)
    return frac > threshold


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU |pred & target| / |pred | target| per row of two (B, L) masks (1 when both are empty): bool, or
    numbers that are all 0 or 1 (a float 0.4 is neither, so it is an error, not True)."""
    check_tensor("pred", pred, ndim=2, what="(B, L) mask")
    check_tensor("target", target, ndim=2, what="(B, L) mask")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    for name, m in (("pred", pred), ("target", target)):
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be a mask of 0s and 1s (or bool)")
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


# --------------------------------------------------------------------------------------------------
# Model-facing wrappers: collect features and attention maps from a model
# --------------------------------------------------------------------------------------------------

def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_input(model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the float, normalised, model-sized batch the trainer feeds (floats pass through).

    Normalisation is affine with weights summing to one, so mixing normalised images equals normalising
    the pixel mixture: separability mixes after this."""
    from .data import normalize_batch, pixel_stats

    imgs = imgs.to(_device_of(model))
    if imgs.dtype != torch.uint8:
        return imgs.float()
    return normalize_batch(imgs, getattr(model, "img_size", None), *pixel_stats(model))


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def load_images(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` (all when None) images and labels of a dataset, as uint8 (N,C,H,W), long (N,).
    An unreadable image file raises ``maskedssl.data.DatasetError`` naming it."""
    from .data import SeededItems

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images[:n], torch.as_tensor(dataset.labels[:n]).long()
    items = [SeededItems(dataset)[i] for i in range(n)]  # a plain index: loaded as the dataset does
    return torch.stack([img for img, _ in items]), torch.tensor([label for _, label in items])


def _batches(images: torch.Tensor, batch_size: int):
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Iterable, pool: str = "cls",
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen, unmasked features of every batch ``(imgs, labels)`` in ``loader``: (feats (N, D) float32 on
    the CPU, labels (N,) long). ``pool``: "cls" (the cls token after the final norm) or "mean" (mean of
    the patch tokens)."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    if device is not None:
        model = model.to(device)
    feats, labels = [], []
    with _eval_mode(model):
        for imgs, y in loader:
            feats.append(model.forward_features(model_input(model, imgs), pool=pool).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def features_of_images(model: torch.nn.Module, images: torch.Tensor, pool: str = "cls",
                       batch_size: int = 256) -> torch.Tensor:
    """``extract_features`` for an in-memory uint8 or normalised float batch (N, C, H, W) -> (N, D)."""
    return pooled_features(model, images, (pool,), batch_size)[pool]


@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor, pools: Sequence[str] = ("cls", "mean"),
                    batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Several poolings of one encoder pass: {pool: (N, D)} with pool "cls" (token 0, after the final
    norm, as ``forward_features(pool="cls")``) or "mean" (of the patch tokens)."""
    if set(pools) - {"cls", "mean"}:
        raise ValueError(f"pools must be 'cls' and/or 'mean', got {pools}")
    out = {pool: [] for pool in pools}  # a pool named twice is one entry (it added each chunk twice)
    with _eval_mode(model):
        for chunk in _batches(images, batch_size):
            tokens = model.forward_features(model_input(model, chunk), pool=None).float().cpu()
            for pool in out:
                out[pool].append(tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1))
    return {pool: torch.cat(f) for pool, f in out.items()}


def _attention_probs(attn_module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute softmax(q k^T * scale) (B, H, T, T) from a timm-style Attention's own qkv projection
    (fused attention never materialises the map)."""
    b, t, _ = x.shape
    heads = attn_module.num_heads
    qkv = attn_module.qkv(x)
    head_dim = qkv.shape[-1] // (3 * heads)
    q, k, _ = qkv.reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = getattr(attn_module, "q_norm", torch.nn.Identity())(q)
    k = getattr(attn_module, "k_norm", torch.nn.Identity())(k)
    scale = getattr(attn_module, "scale", head_dim ** -0.5)
    return ((q * scale) @ k.transpose(-2, -1)).float().softmax(-1)


@contextlib.contextmanager
def capture(blocks: Sequence[torch.nn.Module], attention: bool = True, outputs: bool = True):
    """Record, for each block, its attention maps (recomputed from ``block.attn``'s input) and its output
    tokens on every forward inside the context: yields dict(attention=[[...] per block], outputs=[...])."""
    record = dict(attention=[[] for _ in blocks], outputs=[[] for _ in blocks])
    handles = []
    for i, block in enumerate(blocks):
        if attention:
            handles.append(block.attn.register_forward_pre_hook(
                lambda mod, args, i=i: record["attention"][i].append(
                    _attention_probs(mod, args[0]).detach())))
        if outputs:
            handles.append(block.register_forward_hook(
                lambda mod, args, out, i=i: record["outputs"][i].append(out.detach().float())))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def encoder_maps(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Unmasked encoder pass: per encoder block, patch tokens (N, L, D) (prefix tokens dropped) and
    attention maps (N, H, T, T) with T = num_prefix + L. Returns dict(feats, attention, num_prefix)."""
    blocks = list(model.blocks)
    feats, attn = [[] for _ in blocks], [[] for _ in blocks]
    with _eval_mode(model):
        for chunk in _batches(images, batch_size):
            with capture(blocks) as rec:
                model.forward_features(model_input(model, chunk), pool=None)
            for i in range(len(blocks)):
                feats[i].append(rec["outputs"][i][0].cpu())
                attn[i].append(rec["attention"][i][0].cpu())
    feats = [torch.cat(f) for f in feats]
    num_prefix = feats[0].shape[1] - model.num_patches
    return dict(feats=[f[:, num_prefix:] for f in feats], attention=[torch.cat(a) for a in attn],
                num_prefix=num_prefix)


def _model_forward(model: torch.nn.Module, x: torch.Tensor, progress: float, seed: int):
    """One training-style forward for analysis: i-MAE gets a random partner permutation (its lam drawn as
    in training); every model draws its mask (Self-guided MAE's informed one once ``progress`` is past
    its warm-up)."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(progress=progress)
    if getattr(model, "method", None) == "imae":
        kwargs["partner"] = torch.randperm(x.shape[0], generator=gen).to(x.device)
    torch.manual_seed(seed)  # the model draws its random mask (and i-MAE its lam) from the global RNG
    return model(x, **kwargs)


@torch.no_grad()
def decoder_maps(model: torch.nn.Module, images: torch.Tensor, progress: float = 1.0, seed: int = 0,
                 batch_size: int = 64) -> dict:
    """A masked forward through encoder and decoder: per decoder block, attention maps (R, H, T, T) and
    patch tokens (R, L, Dd) of its first call, the mask (N, L) 1 = masked, and ``row_mask`` (R, L): the
    mask of each attention row. R = N, or 2N for i-MAE, whose decoder runs both branches stacked along
    the batch with the same mask. Returns dict(attention, feats, mask, row_mask, num_prefix, informed)."""
    blocks = list(model.decoder_blocks)
    attn, feats, masks, row_masks, informed = [[] for _ in blocks], [[] for _ in blocks], [], [], []
    with _eval_mode(model):
        for j, chunk in enumerate(_batches(images, batch_size)):
            with capture(blocks) as rec:
                out = _model_forward(model, model_input(model, chunk), progress, seed + j)
            mask = out.mask.float().cpu()
            masks.append(mask)
            row_masks.append(mask.repeat(rec["attention"][0][0].shape[0] // mask.shape[0], 1))
            informed.append(bool(out.extras.get("informed", False)))
            for i in range(len(blocks)):
                attn[i].append(rec["attention"][i][0].cpu())
                feats[i].append(rec["outputs"][i][0].cpu())
    mask = torch.cat(masks)
    num_prefix = attn[0][0].shape[-1] - mask.shape[1]
    return dict(attention=[torch.cat(a) for a in attn], feats=[torch.cat(f)[:, num_prefix:] for f in feats],
                mask=mask, row_mask=torch.cat(row_masks), num_prefix=num_prefix, informed=all(informed))


def _layer_index(layer: int, depth: int) -> int:
    if not -depth <= layer < depth:
        raise ValueError(f"layer must be in [{-depth}, {depth}), got {layer}")
    return layer % depth


@torch.no_grad()
def clustering_metrics(model: torch.nn.Module, images: torch.Tensor, object_masks: torch.Tensor | None = None,
                       *, layer: int = -1, tau: float | None = None, eps: float = 1e-5, progress: float = 1.0,
                       seed: int = 0, batch_size: int = 64) -> dict:
    """Self-guided MAE's analysis on a batch of images (docs/METRICS.md), all as plain floats/lists:

    sigma_f, sigma_s, gap_cosine / gap_attention (mu_intra - mu_inter of the normalized-cut bi-partition
    of encoder layer ``layer``'s patch features, edge weights = cosine or head-averaged symmetrised
    attention), attention_distance (per encoder layer, mean over heads, pixels), decoder_attention_distance,
    exploitation_visible / exploitation_mask (per decoder layer), decoder_sigma_f (last decoder block),
    and with ``object_masks`` (N, H, W): fg_iou (bi-partition foreground vs object patches), mask_iou and
    mask_object_coverage (the model's training mask at ``progress`` vs object patches).
    """
    from .ops import ncut_bipartition

    depths = {"depth": len(model.blocks), "decoder_depth": len(getattr(model, "decoder_blocks", ()))}
    if min(depths.values()) < 1:  # the metrics read encoder and decoder blocks (an IndexError deep inside)
        raise ValueError(f"clustering_metrics needs a model with encoder and decoder blocks, got "
                         f"depth={depths['depth']}, decoder_depth={depths['decoder_depth']}")
    if object_masks is not None:  # checked before the forward passes, and named as itself
        check_tensor("object_masks", object_masks, ndim=3, what="(N, H, W) pixel masks")
        if object_masks.shape != (images.shape[0], model.img_size, model.img_size):
            raise ValueError(f"object_masks must be (N, H, W) = ({images.shape[0]}, {model.img_size}, "
                             f"{model.img_size}) for these images, got {tuple(object_masks.shape)}")
    enc = encoder_maps(model, images, batch_size)
    li = _layer_index(layer, len(enc["feats"]))
    feats, attn, prefix = enc["feats"][li], enc["attention"][li], enc["num_prefix"]
    ncut = ncut_bipartition(feats, tau=tau, eps=eps)
    attn_graph = attn[:, :, prefix:, prefix:].mean(1)
    attn_graph = (attn_graph + attn_graph.transpose(1, 2)) / 2
    patch_size = model.patch_size
    grid = (model.img_size // patch_size, model.img_size // patch_size)
    out = dict(
        layer=li,
        sigma_f=feature_variance(feats).mean().item(),
        sigma_s=similarity_variance(feats).mean().item(),
        gap_cosine=intra_inter_gap(cosine_similarity_matrix(feats), ncut.foreground)["gap"].nanmean().item(),
        gap_attention=intra_inter_gap(attn_graph, ncut.foreground)["gap"].nanmean().item(),
        attention_distance=[attention_distance(a, grid, patch_size, prefix).mean().item()
                            for a in enc["attention"]],
    )
    dec = decoder_maps(model, images, progress, seed, batch_size)
    rates = [exploitation_rates(a, dec["row_mask"], dec["num_prefix"]) for a in dec["attention"]]
    out.update(
        decoder_attention_distance=[attention_distance(a, grid, patch_size, dec["num_prefix"]).mean().item()
                                    for a in dec["attention"]],
        exploitation_visible=[r["visible"] for r in rates],
        exploitation_mask=[r["mask"] for r in rates],
        decoder_sigma_f=feature_variance(dec["feats"][-1]).mean().item(),
        informed=dec["informed"],
    )
    if object_masks is not None:
        obj = patch_object_mask(object_masks, patch_size)
        masked = dec["mask"].bool()
        out.update(
            object_fraction=obj.float().mean().item(),
            fg_iou=mask_iou(ncut.foreground, obj).mean().item(),
            mask_iou=mask_iou(masked, obj).mean().item(),
            # an image without object patches has no coverage (0 / 0): left out of the mean, NaN if all
            mask_object_coverage=((masked & obj).sum(1) / obj.sum(1)).nanmean().item(),
        )
    return out


@torch.no_grad()
def relation_snapshot(model: torch.nn.Module, images: torch.Tensor, temperature: float = 0.1,
                      batch_size: int = 64) -> list[torch.Tensor]:
    """Token relations (N, L, L) of every encoder layer's patch features: compare two checkpoints'
    snapshots on the same images with ``relation_kl``."""
    return [token_relations(f, temperature) for f in encoder_maps(model, images, batch_size)["feats"]]


@torch.no_grad()
def imae_separability(model: torch.nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                      test_images: torch.Tensor, test_labels: torch.Tensor, *,
                      weights: Sequence[float] = MIX_WEIGHTS, pool: str = "cls", ridge: float | str = "auto",
                      probe_epochs: int = 100, batch_size: int = 256, seed: int = 0) -> dict:
    """i-MAE's linear separability of a frozen encoder f (RECIPES.md): pair each image (the subordinate,
    weight alpha) with an image of another class (the dominant, 1 - alpha), fit ridge regression
    f(mixture) -> [f(sub), f(dom)] on the train pairs, report held-out R^2 on the test pairs, and the
    linear-probe accuracy of the subordinate and the dominant label from f(mixture), per alpha."""
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        check_tensor(f"{name}_images", images, ndim=4, what="(N, C, H, W)")
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0] \
                or labels.is_floating_point():
            raise ValueError(f"{name}_labels must be an integer (N,) tensor matching {name}_images "
                             f"({images.shape[0]} images)")
        if images.shape[0] < 2:  # one image is mixed with itself, and one pair scored R^2 = 1
            raise ValueError(f"{name}_images must hold at least 2 images to mix, got {images.shape[0]}")
    for alpha in weights:  # before the forward passes: a bad weight used to fail after the first ones
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 0.5:
            raise ValueError(f"mixing weights must be numbers in (0, 0.5], got {alpha!r}")
    gen = torch.Generator().manual_seed(seed)
    splits = []
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        x = model_input(model, images).cpu()
        partner = sample_other_class_partners(labels, gen)
        base = features_of_images(model, x, pool, batch_size)
        splits.append(dict(x=x, partner=partner, labels=labels, sub=base, dom=base[partner]))
    result = {key: [] for key in ("r2", "r2_sub", "r2_dom", "ridge", "probe_sub", "probe_dom")}
    result["weights"] = [float(w) for w in weights]
    for alpha in weights:
        mix = [features_of_images(model, alpha * s["x"] + (1 - alpha) * s["x"][s["partner"]], pool,
                                  batch_size) for s in splits]
        train, test = splits
        r2 = separability_r2(mix[0], train["sub"], train["dom"], mix[1], test["sub"], test["dom"], ridge)
        for key in ("r2", "r2_sub", "r2_dom", "ridge"):
            result[key].append(r2[key])
        for role, labels_of in (("sub", lambda s: s["labels"]), ("dom", lambda s: s["labels"][s["partner"]])):
            probe = linear_probe(mix[0], labels_of(train), mix[1], labels_of(test), epochs=probe_epochs,
                                 seed=seed)
            result[f"probe_{role}"].append(probe["acc"])
    return result


def plot_separability(results: dict[str, dict], path: str | pathlib.Path) -> pathlib.Path:
    """R^2 against the mixing weight, one line per model (``results``: name -> imae_separability output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, res in results.items():
        axes[0].plot(res["weights"], res["r2"], marker="o", label=name)
        axes[1].plot(res["weights"], res["probe_sub"], marker="o", label=f"{name} sub")
        axes[1].plot(res["weights"], res["probe_dom"], marker="s", linestyle="--", label=f"{name} dom")
    axes[0].set(xlabel="mixing weight of the subordinate image", ylabel="held-out R$^2$",
                title="f(mix) -> [f(sub), f(dom)]")
    axes[1].set(xlabel="mixing weight of the subordinate image", ylabel="probe accuracy",
                title="labels from f(mix)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def finetune(model: torch.nn.Module, train_loader: Iterable, test_loader: Iterable, *, num_classes: int,
             epochs: int = 3, lr: float = 5e-4, weight_decay: float = 0.05, pool: str = "cls",
             device: torch.device | str | None = None, seed: int = 0) -> dict:
    """A short end-to-end fine-tune of a copy of the encoder plus a linear head (the model itself is left
    untouched): AdamW, cosine decay, cross-entropy, no augmentation. Returns dict(acc, train_loss).
    Labels must be class ids in [0, num_classes); both loaders must yield at least one batch."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("epochs", epochs)
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)

    def class_ids(labels) -> torch.Tensor:
        labels = torch.as_tensor(labels).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must be class ids in [0, num_classes = {num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return labels

    torch.manual_seed(seed)
    net = copy.deepcopy(model)
    if device is not None:
        net = net.to(device)
    dev = _device_of(net)
    with torch.no_grad(), _eval_mode(net):
        first = next(iter(train_loader), None)
        if first is None:
            raise ValueError("train_loader yielded no samples")
        imgs = first[0]
        width = net.forward_features(model_input(net, imgs[:1]), pool=pool).shape[-1]
    head = torch.nn.Linear(width, num_classes).to(dev)
    torch.nn.init.zeros_(head.bias)
    torch.nn.init.normal_(head.weight, std=0.01)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(train_loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    net.train()
    losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            for imgs, labels in train_loader:
                logits = head(net.forward_features(model_input(net, imgs), pool=pool))
                loss = F.cross_entropy(logits, class_ids(labels).to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
    correct = count = 0
    with torch.no_grad(), _eval_mode(net):
        for imgs, labels in test_loader:
            pred = head(net.forward_features(model_input(net, imgs), pool=pool)).argmax(1).cpu()
            correct += int((pred == class_ids(labels)).sum())
            count += pred.shape[0]
    if count == 0:
        raise ValueError("test_loader yielded no samples")
    tail = losses[-max(1, len(losses) // 10):]
    return dict(acc=correct / count, train_loss=sum(tail) / len(tail))


# --------------------------------------------------------------------------------------------------
# Whole-model reports and the ``maskedssl evaluate`` subcommand
# --------------------------------------------------------------------------------------------------

def _loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
            seed: int = 0):
    dataset = torch.utils.data.TensorDataset(images, labels)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def evaluate_model(model: torch.nn.Module, train_set, test_set, metrics: Sequence[str] = ("probe", "knn"), *,
                   pools: Sequence[str] = ("cls", "mean"), max_train: int | None = None,
                   max_test: int | None = None, k: int = 20, probe_epochs: int = 100,
                   finetune_epochs: int = 3,
                   weights: Sequence[float] = MIX_WEIGHTS, sep_images: int = 1000, cluster_images: int = 64,
                   layer: int = -1, batch_size: int = 256, seed: int = 0) -> dict:
    """Every requested metric of one model on a train/test dataset pair, as a JSON-ready dict."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    pools = tuple(dict.fromkeys(pools))  # each pool once, in order
    train_x, train_y = load_images(train_set, max_train)
    test_x, test_y = load_images(test_set, max_test)
    out: dict = dict(num_train=int(train_x.shape[0]), num_test=int(test_x.shape[0]))
    if "probe" in metrics or "knn" in metrics:
        train_feats = pooled_features(model, train_x, pools, batch_size)
        test_feats = pooled_features(model, test_x, pools, batch_size)
        for pool in pools:
            tr, te = train_feats[pool], test_feats[pool]
            if "probe" in metrics:
                probe = linear_probe(tr, train_y, te, test_y, epochs=probe_epochs, seed=seed)
                out[f"probe_{pool}"] = probe["acc"]
            if "knn" in metrics:
                out[f"knn_{pool}"] = knn_accuracy(tr, train_y, te, test_y, k=k)
    if "finetune" in metrics and finetune_epochs > 0:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        out["finetune"] = finetune(model, _loader(train_x, train_y, 64, shuffle=True, seed=seed),
                                   _loader(test_x, test_y, batch_size), num_classes=num_classes,
                                   epochs=finetune_epochs, pool=pools[0], seed=seed)["acc"]
    if "separability" in metrics:
        half = max(2, sep_images // 2)
        out["separability"] = imae_separability(model, train_x[:half], train_y[:half], test_x[:half],
                                                test_y[:half], weights=weights, pool=pools[0],
                                                probe_epochs=probe_epochs, batch_size=batch_size, seed=seed)
    if "clustering" in metrics:
        images = test_x[:cluster_images]  # (also at most max_test: the masks must be cut to the same images)
        object_masks = (test_set.object_masks()[:images.shape[0]] if hasattr(test_set, "object_masks")
                        else None)
        out["clustering"] = clustering_metrics(model, images, object_masks, layer=layer,
                                               seed=seed, batch_size=min(batch_size, 64))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``maskedssl evaluate``."""
    parser.add_argument("--ckpt", required=True,
                        help="a maskedssl checkpoint (OUT/checkpoint.pt) or an official "
                        "facebookresearch/mae one")
    parser.add_argument("--data", default="synthetic", help="synthetic[:N] | cifar10:PATH | cifar100:PATH | "
                        "imagefolder:PATH (default: synthetic)")
    parser.add_argument("--metrics", default="probe,knn",
                        help=f"comma-separated subset of {','.join(METRICS)} (default: probe,knn)")
    parser.add_argument("--pool", default="cls,mean", help="features: cls, mean or cls,mean (default: both; "
                        "the first also serves fine-tune and separability)")
    parser.add_argument("--k", type=int, default=20, help="k-NN neighbours (default: 20)")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (default: 100)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tune epochs (default: 3)")
    parser.add_argument("--max-train", type=int, default=None, help="use at most this many train images")
    parser.add_argument("--max-test", type=int, default=None, help="use at most this many test images")
    parser.add_argument("--mix-weights", default=",".join(str(w) for w in MIX_WEIGHTS),
                        help="separability: subordinate mixing weights in (0, 0.5] (default: 0.1,...,0.5)")
    parser.add_argument("--sep-images", type=int, default=1000,
                        help="separability: images, half to fit, half held out (default: 1000)")
    parser.add_argument("--cluster-images", type=int, default=64,
                        help="clustering: test images (default: 64)")
    parser.add_argument("--layer", type=int, default=-1, help="clustering: encoder block whose patch "
                        "features are bi-partitioned, counted from 0 (the model's --sg-layer counts the "
                        "embeddings as 0: --layer L is --sg-layer L + 1; default: -1, the last)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward (default: 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here (and, with separability, "
                        "the R^2 plot next to it as .png)")


def main(args: argparse.Namespace) -> int:
    """``maskedssl evaluate``: print (and optionally save) the metrics of one checkpoint."""
    from .data import build_dataset
    from .train import ConfigError, load_model

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    pools = [p.strip() for p in args.pool.split(",") if p.strip()]
    if not metrics or set(metrics) - set(METRICS):
        raise ConfigError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}, "
                          f"got {args.metrics!r}")
    if not pools or set(pools) - {"cls", "mean"}:
        raise ConfigError(f"--pool must be cls, mean or cls,mean, got {args.pool!r}")
    try:
        weights = [float(w) for w in args.mix_weights.split(",")]
    except ValueError:
        raise ConfigError(f"--mix-weights must be comma-separated numbers, "
                          f"got {args.mix_weights!r}") from None
    if not all(0.0 < w <= 0.5 for w in weights):
        raise ConfigError(f"--mix-weights must lie in (0, 0.5], got {weights}")
    for name in ("k", "probe_epochs", "finetune_epochs", "sep_images", "cluster_images", "batch_size",
                 "max_train", "max_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here")
    torch.manual_seed(args.seed)
    # the clustering metrics read the decoder too (exploitation rates, its attention distance and sigma_F):
    # an encoder-only checkpoint would leave it at its random initialisation, and them meaningless
    # (decoder_norm, decoder_pred: every method has them; i-MAE has heads where the others have decoder_embed)
    needs = ("decoder_norm.weight", "decoder_pred.weight") if "clustering" in metrics else ()
    model = load_model(args.ckpt, map_location=device, required=needs)
    # the train split's images whole (resized and centre-cropped), as the test split's: features of random
    # crops would make every metric noisier and differ from run to run
    train_set = build_dataset(args.data, train=True, img_size=model.img_size, seed=args.seed, augment=False)
    test_set = build_dataset(args.data, train=False, img_size=model.img_size, seed=args.seed)
    try:
        results = evaluate_model(model, train_set, test_set, metrics, pools=pools, max_train=args.max_train,
                                 max_test=args.max_test, k=args.k, probe_epochs=args.probe_epochs,
                                 finetune_epochs=args.finetune_epochs, weights=weights,
                                 sep_images=args.sep_images, cluster_images=args.cluster_images,
                                 layer=args.layer, batch_size=args.batch_size, seed=args.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    results = dict(ckpt=str(args.ckpt), data=args.data, method=getattr(model, "method", "mae"), **results)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        out = pathlib.Path(args.out).expanduser()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as err:
            raise ConfigError(f"cannot write {out}: {err.strerror}") from None
        if "separability" in results:
            plot_separability({results["method"]: results["separability"]}, out.with_suffix(".png"))
        print(f"wrote {out}", file=sys.stderr)
    return 0
