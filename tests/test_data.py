"""maskedssl.data: the synthetic dataset, CIFAR / ImageFolder loading, batching, augmentation, pairing."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from maskedssl import data
from maskedssl.data import DatasetError, build_dataset

# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_index():
    a = build_dataset("synthetic:64", train=True, img_size=32)
    b = build_dataset("synthetic:64", train=True, img_size=32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # an image is a function of its own index: rendering it alone (or among others) gives the same bytes
    alone, mask, label = data.render_synthetic([37, 5], 32, a.seed)
    assert torch.equal(alone[0], a.images[37]) and torch.equal(alone[1], a.images[5])
    assert torch.equal(mask[0], a.object_mask(37)) and int(label[0]) == a[37][1]
    # a larger dataset starts with the same images
    c = build_dataset("synthetic:100", train=True, img_size=32)
    assert torch.equal(c.images[:64], a.images)


def test_synthetic_splits_classes_and_sizes():
    train = build_dataset("synthetic:200", train=True, img_size=24)
    test = build_dataset("synthetic:200", train=False, img_size=24)
    assert len(train) == 200 and len(test) == 40
    img, label = train[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and isinstance(label, int)
    assert not torch.equal(train.images[:40], test.images)
    assert train.num_classes == len(data.CLASS_NAMES) == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [20] * 10
    # images are not trivially constant
    assert train.images.float().std() > 20


def test_synthetic_object_masks_mark_the_object():
    ds = build_dataset("synthetic:50", train=True, img_size=32)
    masks = ds.object_masks()
    assert masks.shape == (50, 32, 32) and masks.dtype == torch.bool
    frac = masks.float().mean((1, 2))
    assert (frac > 0.01).all() and (frac < 0.6).all()
    # the object is drawn in a saturated colour, the background in muted ones
    imgs = ds.images.float() / 255
    saturation = imgs.amax(1) - imgs.amin(1)
    sat_in = (saturation * masks).sum((1, 2)) / masks.sum((1, 2))
    sat_out = (saturation * ~masks).sum((1, 2)) / (~masks).sum((1, 2))
    assert (sat_in > sat_out).float().mean() > 0.9


def test_synthetic_bad_specs():
    with pytest.raises(DatasetError, match="integer"):
        build_dataset("synthetic:many")
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("mnist:/x")
    with pytest.raises(DatasetError, match="needs a path"):
        build_dataset("cifar10")


# ---------------------------------------------------------------------------------------------- CIFAR

def _write_cifar(root, name: str, n: int = 4):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    if name == "cifar10":
        files, key, meta, names_key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", \
            "batches.meta", "label_names"
        classes = [f"c{i}" for i in range(10)]
    else:
        files, key, meta, names_key = ["train", "test"], "fine_labels", "meta", "fine_label_names"
        classes = [f"c{i}" for i in range(100)]
    written = {}
    for f in files:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, len(classes), size=n).tolist()
        with open(root / f, "wb") as fh:
            pickle.dump({b"data": x, key.encode(): y}, fh)
        written[f] = (x, y)
    with open(root / meta, "wb") as fh:
        pickle.dump({names_key: classes}, fh)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_python_pickles(tmp_path, name):
    inner = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    written = _write_cifar(tmp_path / inner, name)
    for path in (tmp_path, tmp_path / inner):  # the folder itself or its parent
        train = build_dataset(f"{name}:{path}", train=True)
        test = build_dataset(f"{name}:{path}", train=False)
        assert len(train) == (20 if name == "cifar10" else 4) and len(test) == 4
        first = "data_batch_1" if name == "cifar10" else "train"
        x, y = written[first]
        assert torch.equal(train.images[0], torch.from_numpy(x[0].reshape(3, 32, 32)))
        assert train[1][1] == y[1]
        assert train.classes[0] == "c0" and train.num_classes == (10 if name == "cifar10" else 100)


def test_cifar_bad_paths(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        build_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match="lacks data_batch_1"):
        build_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="not a CIFAR python pickle"):
        build_dataset(f"cifar10:{tmp_path}", train=False)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match=r"uint8 \(N, 3072\)"):
        build_dataset(f"cifar10:{tmp_path}", train=False)
    # labels were taken as they came: 10 or -1 in CIFAR-10, floats truncated, 2-D lists
    for labels, match in (([0, 10], r"outside \[0, 10\)"), ([0, -1], "outside"), ([0.5, 1.0], "integer"),
                          ([[0], [1]], "integer"), (["a", "b"], "integer")):
        with open(tmp_path / "test_batch", "wb") as fh:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": labels}, fh)
        with pytest.raises(DatasetError, match=match):
            build_dataset(f"cifar10:{tmp_path}", train=False)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 9]}, fh)
    with open(tmp_path / "batches.meta", "wb") as fh:  # 3 names for 10 classes set num_classes = 3
        pickle.dump({"label_names": ["a", "b", "c"]}, fh)
    with pytest.raises(DatasetError, match="must list 10 class names"):
        build_dataset(f"cifar10:{tmp_path}", train=False)


# ---------------------------------------------------------------------------------------------- ImageFolder

def _write_images(folder, classes=("cat", "dog"), per_class=2, size=(20, 14)):
    from PIL import Image

    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, color=(40 * i, 100, 200)).save(folder / c / f"{i}.png")


def test_imagefolder_train_and_val(tmp_path):
    _write_images(tmp_path / "train")
    _write_images(tmp_path / "val", per_class=1)
    train = build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=16)
    val = build_dataset(f"imagefolder:{tmp_path}", train=False, img_size=16)
    assert len(train) == 4 and len(val) == 2 and train.classes == ["cat", "dog"]
    img, label = train[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16) and label == 1
    assert train.augmented_on_cpu and not val.augmented_on_cpu
    assert val[0][0].shape == (3, 16, 16)


def test_imagefolder_train_split_without_augmentation(tmp_path):
    """augment=False (what evaluation reads): the train split's images whole, resized and centre-cropped as
    the val split's, the same on every load; the default for train=True stays MAE's random crops."""
    from test_train import _noise_folder

    _noise_folder(tmp_path / "train", per_class=3)
    plain = build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=16, augment=False)
    as_val = build_dataset(f"imagefolder:{tmp_path / 'train'}", train=False, img_size=16)
    augmented = build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=16)
    assert not plain.augmented_on_cpu and augmented.augmented_on_cpu
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], as_val[i][0]) and torch.equal(plain[i][0], plain[i][0])
    torch.manual_seed(0)
    first = torch.stack([augmented[i][0] for i in range(len(augmented))])
    assert not torch.equal(first, torch.stack([augmented[i][0] for i in range(len(augmented))]))


def test_imagefolder_without_splits_and_tiny_imagenet_val(tmp_path):
    _write_images(tmp_path / "flat")
    assert len(build_dataset(f"imagefolder:{tmp_path / 'flat'}", train=False, img_size=8)) == 4
    # Tiny-ImageNet: val/images/*.png + val_annotations.txt naming each image's class
    _write_images(tmp_path / "tiny" / "train", classes=("n01", "n02"))
    from PIL import Image

    (tmp_path / "tiny" / "val" / "images").mkdir(parents=True)
    for i, c in enumerate(["n02", "n01", "n02"]):
        Image.new("RGB", (8, 8)).save(tmp_path / "tiny" / "val" / "images" / f"v{i}.png")
    (tmp_path / "tiny" / "val" / "val_annotations.txt").write_text(
        "v0.png\tn02\t0\t0\t8\t8\nv1.png\tn01\t0\t0\t8\t8\nv2.png\tn02\t0\t0\t8\t8\n")
    val = build_dataset(f"imagefolder:{tmp_path / 'tiny'}", train=False, img_size=8)
    assert [val[i][1] for i in range(3)] == [1, 0, 1]


def test_imagefolder_val_classes_take_the_train_ids_by_name(tmp_path):
    """val/ numbered its classes by its own folders: with train {ant, bee, cat} and val {bee, cat}, bee
    images were labelled ant and cat images bee; a class train/ lacks got some other class's id."""
    _write_images(tmp_path / "a" / "train", classes=("ant", "bee", "cat"), per_class=1)
    _write_images(tmp_path / "a" / "val", classes=("bee", "cat"), per_class=1)
    val = build_dataset(f"imagefolder:{tmp_path / 'a'}", train=False, img_size=8)
    assert val.classes == ["ant", "bee", "cat"]
    assert [(Path(p).parent.name, t) for p, t in val.samples] == [("bee", 1), ("cat", 2)]
    assert [val[i][1] for i in range(2)] == [1, 2]
    _write_images(tmp_path / "b" / "train", classes=("ant", "bee"), per_class=1)
    _write_images(tmp_path / "b" / "val", classes=("bee", "zebra"), per_class=1)
    with pytest.raises(DatasetError, match="zebra"):
        build_dataset(f"imagefolder:{tmp_path / 'b'}", train=False, img_size=8)


def test_imagefolder_crops_take_crop_scale_min(tmp_path):
    """The ImageFolder crop was fixed at areas 0.2-1 whatever --crop-scale-min said."""
    _write_images(tmp_path / "train", per_class=1)
    dataset = build_dataset(f"imagefolder:{tmp_path}", img_size=8, crop_scale_min=0.5)
    crops = [t for t in dataset.transform.transforms if type(t).__name__ == "RandomResizedCrop"]
    assert [tuple(c.scale) for c in crops] == [(0.5, 1.0)]


def test_imagefolder_with_train_but_no_val_tests_on_train(tmp_path):
    """PATH/train alone: the test split fell back to PATH, whose one 'class' was train/ (every label 0)."""
    _write_images(tmp_path / "train", classes=("ant", "bee"), per_class=2)
    train = build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=8)
    test = build_dataset(f"imagefolder:{tmp_path}", train=False, img_size=8)
    assert test.classes == train.classes == ["ant", "bee"] and test.targets == [0, 0, 1, 1]
    _write_images(tmp_path / "only_val" / "val", per_class=1)  # val/ would have been a training class
    with pytest.raises(DatasetError, match="no train/"):
        build_dataset(f"imagefolder:{tmp_path / 'only_val'}", train=True, img_size=8)


def test_seeded_loading_of_a_subset_in_workers(tmp_path):
    """Crops are a function of (seed, epoch, image): the same with 0 or 2 workers and after a mid-epoch
    skip; a wrapped Subset's __getitems__ is not forwarded (it would take the (i, seed) keys unseeded)."""
    from maskedssl.data import EpochSampler, make_loader

    _write_images(tmp_path / "train", per_class=4, size=(30, 26))
    dataset = torch.utils.data.Subset(build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=8),
                                      list(range(8)))

    def batches(workers, skip=0):
        sampler = EpochSampler(len(dataset), 2, seed=3)
        sampler.set_epoch(1, skip_batches=skip)
        return [imgs for imgs, _ in make_loader(dataset, sampler, workers, torch.device("cpu"))]

    whole = batches(0)
    assert len(whole) == 4 and not torch.equal(whole[0][0], whole[0][1])
    for got, want in zip(batches(2), whole, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(batches(0, skip=1), whole[1:], strict=True):
        assert torch.equal(got, want)


def test_imagefolder_bad_paths(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        build_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="imagefolder"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------------------------- batching

def test_epoch_sampler_shards_and_skips():
    shards = []
    for rank in range(2):
        s = data.EpochSampler(50, batch_size=4, rank=rank, world_size=2, seed=3)
        s.set_epoch(1)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 24  # 6 global batches of 8; the tail of 2 is dropped
    assert not set(shards[0]) & set(shards[1])
    s = data.EpochSampler(50, batch_size=4, rank=0, world_size=2, seed=3)
    s.set_epoch(1, skip_batches=2)
    assert list(s) == shards[0][8:]
    s.set_epoch(2)
    assert list(s) != shards[0]
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        data.EpochSampler(5, batch_size=4, world_size=2)
    # rank 5 of 2 took a share overlapping rank 1's; batch 0 divided by zero; a skip past the end made
    # the length negative
    for kwargs, error, match in ((dict(rank=5, world_size=2), ValueError, "rank"),
                                 (dict(batch_size=0), ValueError, "batch_size"),
                                 (dict(batch_size=4.0), TypeError, "batch_size")):
        with pytest.raises(error, match=match):
            data.EpochSampler(50, **{"batch_size": 4, **kwargs})
    with pytest.raises(ValueError, match="skip_batches"):
        data.EpochSampler(50, batch_size=4).set_epoch(0, skip_batches=13)


def test_class_paired_order_pairs_each_class_within_itself():
    g = torch.Generator().manual_seed(0)
    for labels in (torch.randint(0, 7, (101,), generator=g), torch.arange(40) % 10, torch.tensor([3, 3, 5]),
                   torch.tensor([2]), torch.randint(-3, 10**9, (3000,), generator=g) // 10**6):
        order = data.class_paired_order(labels, torch.Generator().manual_seed(1))
        assert sorted(order.tolist()) == list(range(len(labels)))
        pairs = labels[order[: len(labels) // 2 * 2]].view(-1, 2)
        # only the odd ones out of odd-count classes pair across classes: one pair per two of them
        odd_classes = (torch.unique(labels, return_counts=True)[1] % 2 == 1).sum().item()
        assert (pairs[:, 0] != pairs[:, 1]).sum().item() == odd_classes // 2
    again = data.class_paired_order(labels, torch.Generator().manual_seed(1))
    assert torch.equal(again, order)
    assert not torch.equal(data.class_paired_order(labels, torch.Generator().manual_seed(2)), order)


def test_paired_sampler_gives_every_sample_a_same_class_partner():
    """With 1000 classes and batches of 64 drawn uniformly, about 6% of the samples find one of their class
    in the batch (i-MAE's same_prob = 1 would pair the rest across classes); made of same-class pairs, every
    batch holds one for all but the few odd ones out."""
    labels = torch.randint(0, 1000, (8000,), generator=torch.Generator().manual_seed(0))
    shares = {}
    for paired in (False, True):
        shards = []
        for rank in range(2):
            s = data.EpochSampler(8000, 64, rank=rank, world_size=2, seed=3,
                                  pair_labels=labels if paired else None)
            s.set_epoch(1)
            shards.append(list(s))
            assert len(shards[-1]) == len(s) == 62 * 64
        assert not set(shards[0]) & set(shards[1])
        same = []
        for shard in shards:
            for batch in torch.tensor(shard).split(64):
                partner = data.sample_partners(labels[batch], 1.0, torch.Generator().manual_seed(0))
                same.append((labels[batch][partner] == labels[batch]).float().mean())
        shares[paired] = torch.stack(same).mean().item()
    assert shares[False] < 0.1
    odd = (torch.bincount(labels) % 2 == 1).sum().item()
    assert shares[True] >= 1 - odd / 8000 and shares[True] > 0.9, shares
    s = data.EpochSampler(8000, 64, rank=1, world_size=2, seed=3, pair_labels=labels)
    s.set_epoch(1, skip_batches=5)
    assert list(s) == shards[1][5 * 64:]
    for bad in (labels[:10], labels.float(), labels.view(80, 100)):
        with pytest.raises(DatasetError, match="pair_labels"):
            data.EpochSampler(8000, 64, pair_labels=bad)


def test_tensor_batches_follow_the_sampler():
    ds = build_dataset("synthetic:40", img_size=8)
    sampler = data.EpochSampler(40, 8, seed=0)
    loader = data.make_loader(ds, sampler, 0, torch.device("cpu"))
    order = list(sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    second = order[8:16]
    assert torch.equal(batches[1][0], ds.images[second]) and torch.equal(batches[1][1], ds.labels[second])


# ---------------------------------------------------------------------------------------------- augmentation

def test_augment_identity_crop_is_normalisation():
    imgs = build_dataset("synthetic:4", img_size=16).images
    gen = torch.Generator().manual_seed(0)
    x = data.augment_batch(imgs, 16, gen, scale=(1.0, 1.0), flip=False)
    torch.testing.assert_close(x, data.normalize_batch(imgs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(data.denormalize(x) * 255, imgs.float(), atol=1e-3, rtol=0)


def test_augment_and_normalize_take_uint8_batches_only():
    """Float images in [0, 1] were divided by 255 again and came out nearly constant."""
    gen = torch.Generator().manual_seed(0)
    for imgs in (torch.rand(2, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8)):
        with pytest.raises(TypeError, match="uint8"):
            data.normalize_batch(imgs)
        with pytest.raises(TypeError, match="uint8"):
            data.augment_batch(imgs, 8, gen)


def test_augment_shapes_crops_and_flips():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).remainder(256).to(torch.uint8)
    gen = torch.Generator().manual_seed(1)
    x = data.augment_batch(imgs, 12, gen)
    assert x.shape == (2, 3, 12, 12) and x.dtype == torch.float32
    box = data.random_resized_crop_params(1000, 8, 12, torch.Generator().manual_seed(0))
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 12 + 1e-4).all() and (y0 + h <= 8 + 1e-4).all()
    area = w * h / 96
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6
    # a full-image crop with every sample flipped mirrors the columns
    full = torch.Generator().manual_seed(0)
    flipped = [data.augment_batch(imgs, 8, full, scale=(1.0, 1.0)) for _ in range(8)]
    plain = data.normalize_batch(imgs)
    for f in flipped:
        for b in range(2):
            same = torch.allclose(f[b], plain[b], atol=1e-4)
            assert same or torch.allclose(f[b], plain[b].flip(-1), atol=1e-4)


# ---------------------------------------------------------------------------------------------- pairing

def test_sample_partners_same_and_other_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        same = data.sample_partners(labels, 1.0, gen)
        other = data.sample_partners(labels, 0.0, gen)
        idx = torch.arange(8)
        assert (same != idx).all() and (other != idx).all()
        # class 3 has a single member: it falls back to any other sample
        assert (labels[same[:7]] == labels[:7]).all()
        assert (labels[other] != labels).all()
    assert data.sample_partners(torch.tensor([4]), 1.0, gen).tolist() == [0]
    with pytest.raises(ValueError, match="same_prob"):
        data.sample_partners(labels, 1.5)


def test_sample_partners_and_kmeans_argument_errors():
    """Empty labels were an IndexError from argmax, float or 2-D labels were paired silently (2-D gave a
    2-D partner tensor); kmeans on no rows was a RuntimeError and k = 0 was taken as 1."""
    with pytest.raises(ValueError, match="labels"):
        data.sample_partners(torch.zeros(0, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="labels"):
        data.sample_partners(torch.zeros(2, 2, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match="labels"):
        data.sample_partners(torch.tensor([0.0, 1.0, 0.0]), 1.0)
    for same_prob in ("0.5", None, True):  # True was taken as 1.0, the others failed in a comparison
        with pytest.raises(TypeError, match="same_prob"):
            data.sample_partners(torch.tensor([0, 1, 0]), same_prob)
    with pytest.raises(ValueError, match="feats"):
        data.kmeans(torch.randn(0, 4), 2)
    with pytest.raises(ValueError, match="k must"):
        data.kmeans(torch.randn(5, 4), 0)
    bad = [(dict(k=2.0), TypeError, "k must"), (dict(k=2, iters=-5), ValueError, "iters"),
           (dict(k=2, iters=1.5), TypeError, "iters")]
    for kwargs, error, name in bad:
        with pytest.raises(error, match=name):
            data.kmeans(torch.randn(5, 4), **kwargs)
    with pytest.raises(ValueError, match="finite"):
        data.kmeans(torch.tensor([[1.0, 0.0], [math.nan, 1.0]]), 2)
    with pytest.raises(TypeError, match="labels"):  # bools were paired as classes 0 and 1
        data.sample_partners(torch.tensor([True, False, True]), 1.0)
    # one class for all, or classes of one member each: no self-pairs, whatever same_prob asks
    for labels in (torch.zeros(5, dtype=torch.long), torch.arange(5)):
        for same_prob in (0.0, 1.0):
            partner = data.sample_partners(labels, same_prob, torch.Generator().manual_seed(0))
            assert (partner != torch.arange(5)).all()
    assert data.kmeans(torch.ones(6, 4), 3, generator=torch.Generator().manual_seed(0)).shape == (6,)
    # numpy scalars (np.float32 is not a float, np.int64 not an int) were TypeErrors
    g = torch.Generator().manual_seed(0)
    assert data.sample_partners(torch.tensor([0, 1, 0, 1]), np.float32(1.0), g).tolist() == [2, 3, 0, 1]
    assert data.kmeans(torch.randn(6, 4), np.int64(2), iters=np.int64(3)).shape == (6,)


def test_sample_partners_statistics():
    labels = torch.arange(64) % 4
    gen = torch.Generator().manual_seed(0)
    hits = torch.stack([labels[data.sample_partners(labels, 0.3, gen)] == labels for _ in range(100)])
    assert abs(hits.float().mean().item() - 0.3) < 0.03
    # uniform among candidates: every same-class partner gets picked
    picks = torch.stack([data.sample_partners(labels, 1.0, gen)[0] for _ in range(400)])
    assert set(picks.tolist()) == set(range(4, 64, 4))


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:3] * 5
    truth = torch.arange(90) % 3
    feats = centers[truth] + 0.1 * torch.randn(90, 8, generator=gen)
    ids = data.kmeans(feats, 3, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (90,)
    # the same partition up to renaming
    for c in range(3):
        assert ids[truth == c].unique().numel() == 1
    assert ids.unique().numel() == 3
