"""Evaluation metrics on inputs with a known answer, then the model-facing wrappers on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from maskedssl import evaluate as ev


def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 4
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=gen)
    perm = torch.randperm(labels.shape[0], generator=gen)
    return feats[perm], labels[perm]


# ---------------------------------------------------------------- probes

def test_linear_probe_separable_data_reaches_full_accuracy():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 3, generator=gen)
    x = torch.randn(1500, 16, generator=gen)
    scores = (x @ w).sort(1, descending=True).values
    x = x[scores[:, 0] - scores[:, 1] > 1.0][:600]  # separable by construction, with a margin
    y = (x @ w).argmax(1)
    out = ev.linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=100, lr=0.05)
    assert out["acc"] >= 0.97 and out["train_acc"] >= 0.98
    assert out["num_classes"] == 3


def test_linear_probe_random_labels_is_chance():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(800, 8, generator=gen)
    y = torch.randint(0, 4, (800,), generator=gen)
    assert ev.linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=30)["acc"] < 0.4


def test_linear_probe_is_scale_invariant():
    feats, labels = _clusters(30, 3, 8, 1.0)
    a = ev.linear_probe(feats[:60], labels[:60], feats[60:], labels[60:], epochs=20)
    b = ev.linear_probe(feats[:60] * 1e3 + 5, labels[:60], feats[60:] * 1e3 + 5, labels[60:], epochs=20)
    assert a["acc"] == pytest.approx(b["acc"])


def test_knn_on_clustered_data():
    feats, labels = _clusters(40, 4, 16, 0.3)
    assert ev.knn_accuracy(feats[:100], labels[:100], feats[100:], labels[100:], k=5) == 1.0
    # k larger than the train set is clipped, chunking does not change the answer
    assert ev.knn_accuracy(feats[:100], labels[:100], feats[100:], labels[100:], k=500, chunk=7) == \
        ev.knn_accuracy(feats[:100], labels[:100], feats[100:], labels[100:], k=100)


def test_knn_vote_is_temperature_weighted():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])  # nearest is class 0; two far neighbours of class 1
    assert ev.knn_accuracy(train, labels, test, torch.tensor([0]), k=3, temperature=0.07) == 1.0
    assert ev.knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=100.0) == 1.0


def test_probe_bad_inputs():
    with pytest.raises(ValueError, match="train_labels"):
        ev.linear_probe(torch.randn(4, 2), torch.zeros(3, dtype=torch.long), torch.randn(2, 2),
                        torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="k must"):
        ev.knn_accuracy(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(2, 2),
                        torch.zeros(2, dtype=torch.long), k=0)
    feats, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    for metric in (ev.linear_probe, ev.knn_accuracy):  # each was a RuntimeError or IndexError inside
        with pytest.raises(ValueError, match="test_feats holds no samples"):
            metric(feats, labels, feats[:0], labels[:0])
        with pytest.raises(ValueError, match="train_labels must be class ids >= 0"):
            metric(feats, labels - 1, feats, labels)
        with pytest.raises(ValueError, match="same width"):
            metric(feats, labels, torch.randn(4, 3), labels)
    with pytest.raises(ValueError, match="temperature"):
        ev.knn_accuracy(feats, labels, feats, labels, temperature=0.0)


def test_metric_arguments_are_checked():
    """Each was accepted (an untrained probe's accuracy, NaN relations, no object patch at all) or failed
    deep inside torch with a message that did not name it."""
    feats, labels = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    probe_cases = [(dict(epochs=0), ValueError, "epochs"), (dict(epochs=2.0), TypeError, "epochs"),
                   (dict(batch_size=0), ValueError, "batch_size"), (dict(lr=-1.0), ValueError, "lr"),
                   (dict(weight_decay=math.nan), ValueError, "weight_decay")]
    for kwargs, error, name in probe_cases:
        with pytest.raises(error, match=name):
            ev.linear_probe(feats, labels, feats, labels, **kwargs)
    for kwargs, error, name in [(dict(k=True), TypeError, "k"), (dict(k=2.5), TypeError, "k"),
                                (dict(chunk=0), ValueError, "chunk"), (dict(temperature=-1.0), ValueError,
                                                                       "temperature")]:
        with pytest.raises(error, match=name):
            ev.knn_accuracy(feats, labels, feats, labels, **kwargs)
    nan = feats.clone()
    nan[2, 1] = math.nan
    for metric in (ev.linear_probe, ev.knn_accuracy):
        with pytest.raises(ValueError, match="test_feats must be finite"):
            metric(feats, labels, nan, labels)
    for temperature in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            ev.token_relations(torch.randn(1, 4, 3), temperature)
    with pytest.raises(ValueError, match="patch_size"):
        ev.attention_distance(torch.eye(5).view(1, 1, 5, 5), (2, 2), patch_size=-4)
    obj = torch.ones(4, 4, dtype=torch.bool)
    for threshold, error in ((1.0, ValueError), (2.0, ValueError), (-0.5, ValueError), ("half", TypeError)):
        with pytest.raises(error, match="threshold"):
            ev.patch_object_mask(obj, 2, threshold)
    with pytest.raises(ValueError, match="patch_size"):
        ev.patch_object_mask(obj, 0)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ev.patch_object_mask(torch.ones(10, 10), 4)  # was a 2 x 2 grid, the last rows and columns dropped
    with pytest.raises(ValueError, match="object_mask"):
        ev.patch_object_mask(torch.ones(4), 2)
    # patch-feature metrics: (B, N, D) with enough patches, else an error naming feats (was IndexError/NaN)
    for metric, feats in [(ev.similarity_variance, torch.randn(10, 8)),
                          (ev.feature_variance, torch.randn(10, 8)),
                          (ev.similarity_variance, torch.randn(2, 1, 8)),
                          (ev.token_relations, torch.randn(2, 1, 8))]:
        with pytest.raises(ValueError, match="feats"):
            metric(feats)
    for feats in ([[0.0]], torch.ones(2, 3, 4, dtype=torch.long)):  # not a tensor; not floating point
        with pytest.raises(TypeError, match="feats"):
            ev.cosine_similarity_matrix(feats)
    for pred, target, name in [(torch.ones(2, 4), torch.ones(2, 5), "same shape"),
                               (torch.ones(4), torch.ones(4), "pred")]:
        with pytest.raises(ValueError, match=name):
            ev.mask_iou(pred, target)
    # no masked patch: no mask-token query, so no rates (they were 0, 0 and 0, which do not sum to 1)
    rates = ev.exploitation_rates(torch.full((1, 1, 5, 5), 0.2), torch.zeros(1, 4))
    assert all(math.isnan(v) for v in rates.values())


def test_regression_and_analysis_inputs_are_checked():
    """Each used to broadcast, return a number outside its range, or fail deep inside torch."""
    y = torch.randn(10, 1)
    cases = [
        # (N, 1) against (N,) broadcast to (N, N): an exact prediction scored -19
        (lambda: ev.r2_score(y, y[:, 0]), ValueError, "pred"),
        (lambda: ev.r2_score(torch.randn(10, 2), torch.randn(10, 1)), ValueError, "same shape"),
        (lambda: ev.r2_score([1.0, 2.0], [1.0, 2.0]), TypeError, "y"),
        (lambda: ev.ridge_fit(torch.randn(10, 3), torch.randn(9, 2)), ValueError, "rows"),
        (lambda: ev.ridge_fit(torch.randn(10, 3), torch.randn(10, 2), ridge=-1.0), ValueError, "ridge"),
        (lambda: ev.select_ridge(torch.randn(10, 3), torch.randn(10, 2), grid=()), ValueError, "grid"),
        (lambda: ev.select_ridge(torch.randn(10, 3), torch.randn(10, 2), val_frac=1.0), ValueError,
         "val_frac"),
        (lambda: ev.select_ridge(torch.randn(1, 3), torch.randn(1, 2)), ValueError, "2 pairs"),
        (lambda: ev.exploitation_rates(torch.full((1, 5, 5), 0.2), torch.zeros(1, 4)), ValueError, "attn"),
        (lambda: ev.exploitation_rates(torch.full((1, 1, 5, 6), 0.2), torch.zeros(1, 4)), ValueError,
         "square"),
        # num_prefix -1 gave visible = -1 and mask = 1.2; integer attention rates summing to 5
        (lambda: ev.exploitation_rates(torch.full((1, 1, 5, 5), 0.2), torch.ones(1, 6), num_prefix=-1),
         ValueError, "num_prefix"),
        (lambda: ev.exploitation_rates(torch.ones(1, 1, 5, 5, dtype=torch.long), torch.ones(1, 4)),
         TypeError, "attn"),
        (lambda: ev.exploitation_rates(torch.full((1, 1, 5, 5), 0.2), [[1, 0, 1, 0]]), TypeError, "mask"),
        (lambda: ev.attention_distance(torch.eye(5).view(1, 1, 5, 5), (2,)), ValueError, "grid"),
        (lambda: ev.attention_distance(torch.eye(5).view(1, 1, 5, 5), (-2, -2)), ValueError, "grid"),
        (lambda: ev.attention_distance([[1.0]], (1, 1)), TypeError, "attn"),
        (lambda: ev.intra_inter_gap([[[1.0]]], torch.ones(1, 1, dtype=torch.bool)), TypeError, "similarity"),
        (lambda: ev.relation_kl(torch.rand(3), torch.rand(3)), ValueError, "relations"),
        (lambda: ev.relation_kl([[1.0]], [[1.0]]), TypeError, "p"),
        # NaN features used to pass silently through the patch metrics
        (lambda: ev.feature_variance(torch.full((1, 3, 2), math.nan)), ValueError, "finite"),
        (lambda: ev.similarity_variance(torch.full((1, 3, 2), math.inf)), ValueError, "finite"),
        # a fractional or NaN mask value counted as True
        (lambda: ev.mask_iou(torch.tensor([[0.4, 0.0]]), torch.tensor([[1.0, 0.0]])), ValueError, "pred"),
        (lambda: ev.mask_iou(torch.zeros(1, 2), torch.tensor([[math.nan, 0.0]])), ValueError, "target"),
        (lambda: ev.patch_object_mask(torch.full((4, 4), 2.0), 2), ValueError, "object_mask"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_a_wrong_dtype_is_a_type_error_everywhere():
    """The probes and separability raised ValueError for integer features where the ops and the patch
    metrics raise TypeError; their error is now both (a TypeError that is also the ValueError it was)."""
    feats, labels = torch.randint(0, 5, (6, 3)), torch.tensor([0, 1, 0, 1, 0, 1])
    calls = [lambda: ev.linear_probe(feats, labels, feats.float(), labels),
             lambda: ev.knn_accuracy(feats.float(), labels.float(), feats.float(), labels),
             lambda: ev.separability_r2(*([feats.float()] * 5), feats),
             lambda: ev.feature_variance(feats[None])]
    for call in calls:
        with pytest.raises(TypeError, match="feats|labels|test_dom"):
            call()
    with pytest.raises(ValueError):
        calls[0]()


def test_r2_of_vectors_and_ridge_selection_on_one_validation_pair():
    y = torch.randn(10, dtype=torch.float64)
    assert ev.r2_score(y, y) == 1.0
    assert ev.r2_score(y, torch.full_like(y, float(y.mean()))) == pytest.approx(0.0, abs=1e-12)
    # four pairs validate on one: R^2 of one pair is undefined (1 or 0), so the scores tied and the first
    # (smallest) ridge won on noise; the squared error ranks the same as R^2 on more pairs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    assert ev.select_ridge(x, x @ w) <= 1e-4
    # XOR on the unit square: whichever corner is held out, the affine map through the other three
    # predicts it 2 off, and their mean at most 2/3 off, so the strong penalty must win
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    xor = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
    assert ev.select_ridge(corners, xor, grid=(1e-8, 10.0)) == 10.0  # R^2 of the one pair tied: 1e-8
    # one train pair: "auto" has nothing to validate on and uses ridge_fit's default
    one = ev.separability_r2(x[:1], x[:1], x[:1], x, x, x)
    assert one["ridge"] == 1e-3 and math.isfinite(one["r2"])


def test_a_dimension_constant_on_the_train_set_is_dropped():
    """standardize divided its zero spread by 1e-6: test noise of 0.01 became 1e4, and the probe's
    untrained weight on it (no gradient on a constant) decided the test logits."""
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 3, generator=g), torch.randn(20, 3, generator=g)
    train[:, 1] = 0.7
    z_train, z_test = ev.standardize(train, test)
    assert (z_train[:, 1] == 0).all() and (z_test[:, 1] == 0).all()
    torch.testing.assert_close(z_train[:, 0].std(unbiased=False), torch.tensor(1.0), rtol=1e-4, atol=0)
    xt, xs = torch.randn(200, 8, generator=g), torch.randn(100, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    yt, ys = (xt @ w).argmax(1), (xs @ w).argmax(1)
    clean = ev.linear_probe(xt, yt, xs, ys, epochs=50)["acc"]
    dead = ev.linear_probe(torch.cat([xt, torch.zeros(200, 1)], 1), yt,
                           torch.cat([xs, 0.01 * torch.randn(100, 1, generator=g)], 1), ys, epochs=50)["acc"]
    assert dead == clean  # was 0.43 against 0.83


def test_attention_distance_leaves_out_queries_with_no_patch_attention():
    # cls + 2 x 2 patches; query 0 attends uniformly to the patches, queries 1-3 only to the cls token
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, :, 0] = 1.0
    attn[0, 0, 1] = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25])
    uniform = (0 + 1 + 1 + math.sqrt(2)) / 4  # from patch (0, 0) to the four patch centres
    assert ev.attention_distance(attn, (2, 2)).item() == pytest.approx(uniform)  # was uniform / 4
    attn[0, 0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    assert math.isnan(ev.attention_distance(attn, (2, 2)).item())


def test_integer_object_masks_and_masks_of_ones():
    png = torch.zeros(4, 4, dtype=torch.uint8)
    png[:2, :2] = 255  # a 0/255 mask: one object pixel of four used to make the whole patch object
    png[2, 2] = 255
    want = ev.patch_object_mask(png.bool(), 2)
    assert torch.equal(ev.patch_object_mask(png, 2), want) and want.tolist() == [[True, False, False, False]]
    pred, target = torch.tensor([[1, 0, 1, 0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert ev.mask_iou(pred, target).item() == pytest.approx(1 / 3)


def test_knn_small_temperature_does_not_overflow():
    """exp(cos / 1e-3) overflowed to inf for every neighbour: the votes tied and argmax took class 0."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[0.05, 1.0]])
    assert ev.knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=1e-3) == 1.0


def test_degenerate_inputs_give_defined_metrics():
    # one class, constant features: the probe and k-NN can only be right
    const, one_class = torch.zeros(6, 4), torch.zeros(6, dtype=torch.long)
    assert ev.linear_probe(const, one_class, const, one_class, epochs=2)["acc"] == 1.0
    assert ev.knn_accuracy(const, one_class, const, one_class) == 1.0
    # targets without variance: R^2 is undefined; 1 for an exact fit, 0 otherwise (was -1e13)
    assert ev.r2_score(torch.ones(5, 2), torch.ones(5, 2)) == 1.0
    assert ev.r2_score(torch.ones(5, 2), torch.zeros(5, 2)) == 0.0
    assert ev.r2_score(torch.ones(1, 3), torch.randn(1, 3)) == 0.0
    result = ev.separability_r2(*(torch.randn(1, 4) for _ in range(6)))
    assert all(math.isfinite(result[k]) for k in ("r2", "r2_sub", "r2_dom"))


# ---------------------------------------------------------------- separability

def test_separability_argument_errors():
    """Mismatched rows or widths were RuntimeErrors from torch.cat / matmul, a list an AttributeError, a
    negative ridge an R^2 of -57, ridge="foo" an unrelated TypeError."""
    good = [torch.randn(8, 4) for _ in range(6)]
    names = ["train_mix", "train_sub", "train_dom", "test_mix", "test_sub", "test_dom"]
    for i, name in enumerate(names):
        for bad, error in ((good[i][:-1], ValueError), (good[i][:, :-1], ValueError),
                           (good[i].tolist(), TypeError), (good[i].long(), ValueError),
                           (good[i][None], ValueError), (good[i].clone().fill_(float("nan")), ValueError)):
            args = list(good)
            args[i] = bad
            with pytest.raises(error, match=name):
                ev.separability_r2(*args)
    for ridge, error in ((-1.0, ValueError), (0, ValueError), (float("nan"), ValueError),
                         (math.inf, ValueError), ("foo", ValueError), (None, TypeError), (True, TypeError)):
        with pytest.raises(error, match="ridge"):
            ev.separability_r2(*good, ridge=ridge)
    with pytest.raises(ValueError, match="no pairs"):
        ev.separability_r2(*(t[:0] for t in good))
    with pytest.raises(TypeError, match="train_feats"):
        ev.linear_probe([[0.0]], torch.tensor([0]), torch.zeros(1, 1), torch.tensor([0]))
    with pytest.raises(TypeError, match="test_labels"):
        ev.knn_accuracy(torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(1, 1), [0])


def _mixtures(n: int, alpha: float, seed: int):
    """Sub images live on the first 6 pixels and dom images on the last 6: mixtures are separable."""
    gen = torch.Generator().manual_seed(seed)
    sub = torch.cat([torch.randn(n, 6, generator=gen), torch.zeros(n, 6)], 1)
    dom = torch.cat([torch.zeros(n, 6), torch.randn(n, 6, generator=gen)], 1)
    return alpha * sub + (1 - alpha) * dom, sub, dom


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5])
def test_separable_mixtures_with_linear_encoder_give_r2_one(alpha):
    f = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))  # injective linear encoder
    train = [t @ f for t in _mixtures(200, alpha, 4)]
    test = [t @ f for t in _mixtures(100, alpha, 5)]
    out = ev.separability_r2(*train, *test, ridge=1e-9)
    assert out["r2"] == pytest.approx(1.0, abs=1e-5)
    assert out["r2_sub"] == pytest.approx(1.0, abs=1e-5) and out["r2_dom"] == pytest.approx(1.0, abs=1e-5)


def test_overlapping_mixtures_are_not_separable():
    """Sub and dom on the same pixels: f(mix) only holds the weighted sum, R^2 well below 1."""
    gen = torch.Generator().manual_seed(6)
    sub, dom = torch.randn(300, 8, generator=gen), torch.randn(300, 8, generator=gen)
    mix = 0.5 * sub + 0.5 * dom
    out = ev.separability_r2(mix[:200], sub[:200], dom[:200], mix[200:], sub[200:], dom[200:])
    assert 0.3 < out["r2"] < 0.7  # the best linear guess of each is half the sum: R^2 = 1/2


def test_random_targets_give_r2_near_zero():
    gen = torch.Generator().manual_seed(7)
    x, sub, dom = (torch.randn(2000, 8, generator=gen) for _ in range(3))
    out = ev.separability_r2(x[:1500], sub[:1500], dom[:1500], x[1500:], sub[1500:], dom[1500:])
    assert abs(out["r2"]) < 0.03


def test_ridge_recovers_affine_map_and_r2():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(100, 5, generator=gen)
    w, b = torch.randn(5, 3, generator=gen), torch.randn(1, 3, generator=gen)
    weight, bias = ev.ridge_fit(x, x @ w + b, ridge=1e-12)
    torch.testing.assert_close(weight.float(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.float(), b, atol=1e-5, rtol=1e-5)
    y = torch.randn(50, 2, generator=gen)
    assert ev.r2_score(y, y) == 1.0
    assert ev.r2_score(y, y.mean(0, keepdim=True).expand_as(y)) == pytest.approx(0.0, abs=1e-12)


def test_ridge_selection_prefers_a_strong_penalty_on_noise():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(60, 40, generator=gen)
    noise = torch.randn(60, 4, generator=gen)
    assert ev.select_ridge(x, noise) >= 1.0  # nothing to learn: shrink to the mean
    clean = x @ torch.randn(40, 4, generator=gen)
    assert ev.select_ridge(x, clean) <= 1e-2  # an exact linear map: keep the penalty small
    # with too few pairs for the width, the tuned penalty keeps held-out R^2 near 0, not far below
    a, b, c = (torch.randn(80, 40, generator=gen) for _ in range(3))
    assert ev.separability_r2(a[:40], b[:40], c[:40], a[40:], b[40:], c[40:])["r2"] > -0.2
    assert ev.separability_r2(a[:40], b[:40], c[:40], a[40:], b[40:], c[40:], ridge=1e-4)["r2"] < -0.5


def test_other_class_partners():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    partners = ev.sample_other_class_partners(labels, torch.Generator().manual_seed(0))
    assert (labels[partners] != labels).all()
    # one class: any other sample, never the sample itself (it could draw itself from the whole batch)
    for seed in range(20):
        one_class = ev.sample_other_class_partners(torch.zeros(4, dtype=torch.long),
                                                   torch.Generator().manual_seed(seed))
        assert (one_class != torch.arange(4)).all() and ((one_class >= 0) & (one_class < 4)).all()
    assert ev.sample_other_class_partners(torch.zeros(1, dtype=torch.long),
                                          torch.Generator().manual_seed(0)).tolist() == [0]


# ---------------------------------------------------------------- patch clustering

def _two_clusters(m: int, theta: float):
    """2m unit features: the first m along e1, the rest at angle theta from e1 (so cos = cos(theta))."""
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([math.cos(theta), math.sin(theta), 0.0])
    return torch.cat([a.expand(m, 3), b.expand(m, 3)]).unsqueeze(0)


@pytest.mark.parametrize("theta", [math.pi / 2, math.pi / 3])
def test_planted_clusters_gap_variances_and_ncut(theta):
    m = 8
    feats = _two_clusters(m, theta) * 3.0  # feature scale must not matter
    truth = torch.arange(2 * m).unsqueeze(0) < m
    sim = ev.cosine_similarity_matrix(feats)
    out = ev.intra_inter_gap(sim, truth)
    assert out["intra"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["inter"].item() == pytest.approx(math.cos(theta), abs=1e-6)
    assert out["gap"].item() == pytest.approx(1.0 - math.cos(theta), abs=1e-6)
    # a planted partition is recovered by the normalized cut, up to which side is foreground
    from maskedssl.ops import ncut_bipartition
    fg = ncut_bipartition(feats).foreground
    assert torch.equal(fg, truth) or torch.equal(fg, ~truth)
    assert ev.intra_inter_gap(sim, fg)["gap"].item() == pytest.approx(1.0 - math.cos(theta), abs=1e-6)
    # sigma_F = 1 - ||mean||^2, mean = (e1 + b) / 2
    mean_sq = (2 + 2 * math.cos(theta)) / 4
    assert ev.feature_variance(feats).item() == pytest.approx(1 - mean_sq, abs=1e-6)
    # sigma_s: each row holds m-1 ones and m values cos(theta) off the diagonal
    p = (m - 1) / (2 * m - 1)
    expected = p * (1 - p) * (1 - math.cos(theta)) ** 2
    assert ev.similarity_variance(feats).item() == pytest.approx(expected, abs=1e-6)


def test_identical_features_have_zero_variances():
    feats = torch.randn(1, 1, 5).expand(2, 6, 5)
    assert torch.allclose(ev.feature_variance(feats), torch.zeros(2), atol=1e-6)
    assert torch.allclose(ev.similarity_variance(feats), torch.zeros(2), atol=1e-6)


def test_gap_with_empty_side_is_nan():
    sim = torch.eye(4).unsqueeze(0)
    assert torch.isnan(ev.intra_inter_gap(sim, torch.ones(1, 4, dtype=torch.bool))["gap"]).all()
    with pytest.raises(ValueError, match="partition"):
        ev.intra_inter_gap(sim, torch.ones(1, 3, dtype=torch.bool))


def test_relation_kl():
    feats = torch.randn(2, 7, 4)
    rel = ev.token_relations(feats)
    torch.testing.assert_close(rel.sum(-1), torch.ones(2, 7))
    assert (rel.diagonal(dim1=1, dim2=2) == 0).all()
    assert torch.allclose(ev.relation_kl(rel, rel), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert (ev.relation_kl(rel, ev.token_relations(torch.randn(2, 7, 4))) > 0).all()
    # known value: KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 log 2 + 1/2 log(2/3)
    p = torch.tensor([[[0.5, 0.5]]])
    q = torch.tensor([[[0.25, 0.75]]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert ev.relation_kl(p, q).item() == pytest.approx(expected)


def test_exploitation_rates_of_hand_made_attention():
    # cls + 4 patches; patches 1 and 3 (0-based) are masked
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    attn = torch.zeros(1, 2, 5, 5)
    # head 0: every query puts 0.2 on cls, 0.5 on visible patch 0, 0.3 on mask patch 3
    attn[0, 0, :, 0], attn[0, 0, :, 1], attn[0, 0, :, 4] = 0.2, 0.5, 0.3
    # head 1: mask queries put everything on the other mask token; visible queries on cls
    attn[0, 1, 2, 4] = 1.0
    attn[0, 1, 4, 2] = 1.0
    attn[0, 1, [0, 1, 3], 0] = 1.0
    out = ev.exploitation_rates(attn, mask)
    assert out["visible"] == pytest.approx(0.25)
    assert out["mask"] == pytest.approx(0.65)
    assert out["prefix"] == pytest.approx(0.10)
    with pytest.raises(ValueError, match="mask"):
        ev.exploitation_rates(attn, mask[:, :3])


def test_attention_distance_of_known_maps():
    grid, n = (3, 4), 12
    eye = torch.eye(n + 1).view(1, 1, n + 1, n + 1)
    assert ev.attention_distance(eye, grid, patch_size=4).item() == 0.0
    # every query attends to patch 0 only (plus cls, which is dropped): mean distance to the corner
    attn = torch.zeros(1, 1, n + 1, n + 1)
    attn[..., 0] = 0.5
    attn[..., 1] = 0.5
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    expected = (ys.square() + xs.square()).sqrt().mean().item() * 4
    assert ev.attention_distance(attn, grid, patch_size=4).item() == pytest.approx(expected, rel=1e-6)
    # uniform attention over two heads, no prefix token
    uniform = torch.full((2, 2, n, n), 1.0 / n)
    centres = torch.stack([ys.flatten(), xs.flatten()], 1)
    expected = torch.cdist(centres, centres).mean().item()
    torch.testing.assert_close(ev.attention_distance(uniform, grid, num_prefix=0),
                               torch.full((2,), expected))


def test_patch_object_mask_and_iou():
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[:4, :4] = True  # the top-left 2 x 2 patches of a 4 x 4 grid (patch 2)
    obj[4, 4] = True  # a quarter of a patch: below threshold
    patches = ev.patch_object_mask(obj, 2)
    expected = torch.zeros(1, 16, dtype=torch.bool)
    expected[0, [0, 1, 4, 5]] = True
    assert torch.equal(patches, expected)
    pred = torch.zeros(1, 16, dtype=torch.bool)
    pred[0, [0, 1, 2]] = True  # 2 hits, union 5
    assert ev.mask_iou(pred, expected).item() == pytest.approx(2 / 5)
    assert ev.mask_iou(expected, expected).item() == 1.0
    assert ev.mask_iou(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)).item() == 1.0


# ---------------------------------------------------------------- model-facing helpers

def test_captured_attention_matches_timm_block():
    """The map recomputed from qkv in the hook reproduces the block's own attention output."""
    from timm.models.vision_transformer import Block

    block = Block(dim=24, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, 9, 24)
    with ev.capture([block]) as rec:
        out = block(x)
    attn = rec["attention"][0][0]
    assert attn.shape == (2, 3, 9, 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 9))
    torch.testing.assert_close(rec["outputs"][0][0], out)
    mod = block.attn
    v = mod.qkv(block.norm1(x)).reshape(2, 9, 3, 3, 8).permute(2, 0, 3, 1, 4)[2]
    attn_out = mod.proj((attn @ v).transpose(1, 2).reshape(2, 9, 24))
    torch.testing.assert_close(attn_out, mod(block.norm1(x)), atol=1e-5, rtol=1e-5)
    # hooks are removed on exit
    block(x)
    assert len(rec["attention"][0]) == 1


@pytest.fixture(scope="module")
def micro_mae():
    from maskedssl.models import build_model

    torch.manual_seed(0)
    return build_model("mae", "micro").eval()


@pytest.fixture(scope="module")
def synthetic():
    from maskedssl.data import build_dataset

    train = build_dataset("synthetic:60", train=True, img_size=32)
    test = build_dataset("synthetic:40", train=False, img_size=32)
    return train, test


def test_extract_features_and_probes_on_a_model(micro_mae, synthetic):
    train, test = synthetic
    loader = torch.utils.data.DataLoader(train, batch_size=16)
    feats, labels = ev.extract_features(micro_mae, loader, pool="cls")
    assert feats.shape == (60, 96) and labels.shape == (60,)
    direct = micro_mae.forward_features(ev.model_input(micro_mae, train.images[:16]), pool="cls")
    torch.testing.assert_close(feats[:16], direct)
    mean_feats, _ = ev.extract_features(micro_mae, loader, pool="mean")
    assert not torch.allclose(feats, mean_feats)
    with pytest.raises(ValueError, match="pool"):
        ev.extract_features(micro_mae, loader, pool="max")


def test_clustering_metrics_on_a_model(micro_mae, synthetic):
    train, _ = synthetic
    out = ev.clustering_metrics(micro_mae, train.images[:8], train.object_masks()[:8], batch_size=4)
    assert 0 <= out["sigma_f"] <= 1 and out["sigma_s"] >= 0
    assert math.isfinite(out["gap_cosine"]) and math.isfinite(out["gap_attention"])
    assert len(out["attention_distance"]) == 4 and len(out["exploitation_mask"]) == 2
    for v, m in zip(out["exploitation_visible"], out["exploitation_mask"]):
        assert 0 <= v <= 1 and 0 <= m <= 1 and v + m <= 1 + 1e-6
    assert 0 <= out["fg_iou"] <= 1 and 0 <= out["mask_object_coverage"] <= 1
    # coverage of an image without object patches is 0 / 0: left out of the mean (it counted as 0)
    masks = train.object_masks()[:8].clone()
    masks[:4] = False
    emptied = ev.clustering_metrics(micro_mae, train.images[:8], masks, batch_size=4)
    masked = ev.decoder_maps(micro_mae, train.images[:8], batch_size=4)["mask"].bool()[4:]
    obj = ev.patch_object_mask(masks[4:], micro_mae.patch_size)
    want = ((masked & obj).sum(1) / obj.sum(1)).mean().item()
    assert emptied["mask_object_coverage"] == pytest.approx(want)
    with pytest.raises(ValueError, match="object_masks"):  # named pred / target before
        ev.clustering_metrics(micro_mae, train.images[:8], train.object_masks()[:7], batch_size=4)
    assert out["informed"] is False
    from maskedssl.models import build_model

    for depths in (dict(decoder_depth=0), dict(depth=0)):  # valid models; an IndexError deep inside before
        with pytest.raises(ValueError, match="needs a model with encoder and decoder blocks"):
            ev.clustering_metrics(build_model("mae", "micro", **depths), train.images[:2])
    snap = ev.relation_snapshot(micro_mae, train.images[:4])
    assert len(snap) == 4
    assert torch.allclose(ev.relation_kl(snap[-1], snap[-1]), torch.zeros(4, dtype=torch.float64))


def test_separability_and_finetune_on_a_model(micro_mae, synthetic, tmp_path):
    train, test = synthetic
    res = ev.imae_separability(micro_mae, train.images, train.labels, test.images, test.labels,
                               weights=(0.1, 0.5), probe_epochs=5)
    assert res["weights"] == [0.1, 0.5] and len(res["r2"]) == 2 and len(res["probe_dom"]) == 2
    assert all(r <= 1 for r in res["r2"])
    assert ev.plot_separability({"mae": res}, tmp_path / "sep.png").stat().st_size > 0
    for args, name in [((train.images, train.labels[:-1], test.images, test.labels), "train_labels"),
                       ((train.images, train.labels, test.images, test.labels.float()), "test_labels"),
                       ((train.images[0], train.labels, test.images, test.labels), "train_images")]:
        with pytest.raises(ValueError, match=name):  # was a RuntimeError from deep inside
            ev.imae_separability(micro_mae, *args)
    with pytest.raises(ValueError, match="mixing weights"):
        ev.imae_separability(micro_mae, train.images, train.labels, test.images, test.labels,
                             weights=(0.1, 0.7))
    with pytest.raises(ValueError, match="at least 2 images"):  # one image with itself scored R^2 = 1
        ev.imae_separability(micro_mae, train.images[:1], train.labels[:1], test.images, test.labels)
    before = {k: v.clone() for k, v in micro_mae.state_dict().items()}
    loader = torch.utils.data.DataLoader(train, batch_size=30)
    test_loader = torch.utils.data.DataLoader(test, batch_size=40)
    out = ev.finetune(micro_mae, loader, test_loader, num_classes=10, epochs=1)
    assert 0 <= out["acc"] <= 1 and math.isfinite(out["train_loss"])
    empty = torch.utils.data.DataLoader(torch.utils.data.Subset(test, []), batch_size=4)
    for kwargs, loaders, error, match in [
            (dict(epochs=0), (loader, test_loader), ValueError, "epochs"),  # was a ZeroDivisionError
            (dict(epochs=1.5), (loader, test_loader), TypeError, "epochs"),
            (dict(num_classes=2), (loader, test_loader), ValueError, "class ids"),  # was an IndexError
            (dict(), (loader, empty), ValueError, "test_loader"),  # was acc = 0
            (dict(), (empty, test_loader), ValueError, "train_loader")]:
        with pytest.raises(error, match=match):
            ev.finetune(micro_mae, *loaders, **{"num_classes": 10, "epochs": 1, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in micro_mae.state_dict().items())  # the copy was trained


def test_evaluate_subcommand(micro_mae, tmp_path, capsys):
    import json

    from maskedssl import cli
    from maskedssl.train import MethodConfig, TrainConfig

    cfg = TrainConfig(method=MethodConfig(method="mae", model="micro")).to_dict()
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"config": cfg, "model": micro_mae.state_dict()}, ckpt)
    out = tmp_path / "eval" / "res.json"
    rc = cli.main(["evaluate", "--ckpt", str(ckpt), "--data", "synthetic:50", "--metrics", "probe,knn",
                   "--pool", "mean", "--probe-epochs", "3", "--k", "5", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["method"] == "mae" and 0 <= res["probe_mean"] <= 1 and 0 <= res["knn_mean"] <= 1
    assert "probe_cls" not in res
    assert cli.main(["evaluate", "--ckpt", str(ckpt), "--metrics", "probe,nope"]) == 2
    # an encoder-only checkpoint: the encoder's metrics, but not clustering, which reads the decoder too
    encoder = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in micro_mae.state_dict().items()
                          if not k.startswith(("decoder", "mask_token"))}}, encoder)
    capsys.readouterr()
    base = ["evaluate", "--ckpt", str(encoder), "--data", "synthetic:50", "--pool", "mean", "--k", "5"]
    assert cli.main([*base, "--metrics", "knn"]) == 0
    assert cli.main([*base, "--metrics", "clustering", "--cluster-images", "4"]) == 2
    assert "has no decoder_norm.weight" in capsys.readouterr().err
    # an i-MAE checkpoint has heads instead of decoder_embed: its clustering metrics were refused as if it
    # had no decoder
    from maskedssl.models import build_model

    torch.manual_seed(0)
    imae = tmp_path / "imae.pt"
    torch.save({"config": TrainConfig(method=MethodConfig(method="imae", model="micro")).to_dict(),
                "model": build_model("imae", "micro").state_dict()}, imae)
    assert cli.main(["evaluate", "--ckpt", str(imae), "--data", "synthetic:50", "--metrics", "clustering",
                     "--cluster-images", "4", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["clustering"]["exploitation_mask"]) == 2
    # a pool named twice added each chunk twice (twice the rows of the labels); clustering with fewer test
    # images than --cluster-images cut the object masks to the latter
    assert cli.main(["evaluate", "--ckpt", str(ckpt), "--data", "synthetic:50", "--metrics", "knn,clustering",
                     "--pool", "mean,mean", "--k", "5", "--max-test", "5", "--cluster-images", "8",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "knn_mean" in res and res["num_test"] == 5 and 0 <= res["clustering"]["fg_iou"] <= 1
    assert cli.main(["evaluate", "--ckpt", str(ckpt), "--mix-weights", "0.7"]) == 2
    assert "mix-weights" in capsys.readouterr().err
