"""Datasets, batching and device-side augmentation for pretraining.

Every dataset yields ``(img, label)`` with ``img`` a uint8 (C, H, W) tensor: images cross to the device as
bytes (a quarter of float32) and are cropped, flipped and normalised there, batched
(``augment_batch``/``normalize_batch``). Specs understood by ``build_dataset``:

- ``synthetic`` / ``synthetic:N``: embedded, procedurally generated objects on textured backgrounds,
  with class labels and ground-truth object masks (``object_mask(i)``); no files, no download.
- ``cifar10:PATH``, ``cifar100:PATH``: the standard python-pickle folders (or their parent).
- ``imagefolder:PATH``: one sub-folder per class (ImageNet, Tiny-ImageNet); uses ``PATH/train`` and
  ``PATH/val`` when present. Decoding dominates here, so the random crop runs on the CPU workers.

i-MAE's semantic pairing lives here too: ``sample_partners`` (same class with probability ``same_prob``,
within the batch), ``EpochSampler(pair_labels=...)`` (batches made of same-class pairs, so that the batch
holds a same-class partner for every sample whatever the number of classes) and ``kmeans`` (cluster ids
standing in for labels when the data has none).
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# MAE normalises every dataset with the ImageNet statistics; so do we, so checkpoints transfer.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_stats(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) ``model`` normalises its pixels with (its ``mean``/``std`` buffers, which
    a model config can set), else ImageNet's: training, evaluation and pictures all use these."""
    if hasattr(model, "mean") and hasattr(model, "std"):
        return tuple(model.mean.tolist()), tuple(model.std.tolist())
    return IMAGENET_MEAN, IMAGENET_STD


class DatasetError(ValueError):
    """A dataset spec or path that cannot be used; the CLI prints its message as one line."""


# ----------------------------------------------------------------------------------------------------
# The embedded synthetic dataset

SHAPES = ("disk", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "stripes")
CLASS_NAMES = tuple(f"{s}/{t}" for s in SHAPES for t in TEXTURES)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32)."""
    low32 = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & low32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & low32
    return x ^ (x >> 16)


def _uniform(seed: int, index: torch.Tensor, stream: int, shape=()) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): value k of ``stream`` for image ``index`` is a hash of
    (seed, index, stream, k), so every image is reproducible alone and all are drawn in one vector op."""
    count = math.prod(shape)
    key = _hash32(_hash32(torch.full_like(index, seed & 0xFFFFFFFF)) ^ index)
    key = key ^ (stream * 0x9E3779B9 & 0xFFFFFFFF)
    k = torch.arange(count, dtype=torch.int64)
    bits = _hash32(_hash32(key.view(-1, 1)) ^ k.view(1, -1))
    return (bits.float() / 2.0**32).view(-1, *shape)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N,) hue/saturation/value in [0, 1] -> (N, 3) RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h.unsqueeze(-1)) % 6
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """All shapes at once in object coordinates (unit = radius): (N, len(SHAPES), S, S) bool."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    return torch.stack([
        r < 1.0,
        torch.maximum(au, av) < 0.8,
        (v > -0.5) & (v < 1.0 - math.sqrt(3) * au),
        (r > 0.55) & (r < 1.0),
        ((au < 0.3) & (av < 1.0)) | ((av < 0.3) & (au < 1.0)),
    ], dim=1)


def render_synthetic(indices, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render images ``indices`` of the synthetic stream ``seed``: (imgs uint8 (N,3,S,S), masks bool
    (N,S,S), labels long (N,)). Image i depends only on (seed, i, S), never on which others are rendered."""
    index = torch.as_tensor(list(indices), dtype=torch.int64)
    n = index.shape[0]
    labels = index % len(CLASS_NAMES)
    shape_id, texture_id = labels // len(TEXTURES), labels % len(TEXTURES)
    scene = _uniform(seed, index, 0, (15,))  # one stream for the scalar scene parameters

    def spread(col: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * scene[:, col].view(-1, 1, 1)

    radius = spread(0, 0.16, 0.34)
    cx = radius + (1 - 2 * radius) * scene[:, 1].view(-1, 1, 1)
    cy = radius + (1 - 2 * radius) * scene[:, 2].view(-1, 1, 1)
    angle = spread(3, 0, 2 * math.pi)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dx, dy = coords.view(1, 1, -1) - cx, coords.view(1, -1, 1) - cy
    u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / radius
    v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / radius
    masks = _shape_masks(u, v)[torch.arange(n), shape_id]

    # Background: two muted colours blended by smooth low-frequency noise, plus fine grain.
    bg = [_hsv_to_rgb(scene[:, c], 0.5 * scene[:, c + 1], 0.1 + 0.5 * scene[:, c + 2]).view(n, 3, 1, 1)
          for c in (4, 7)]
    blobs = F.interpolate(_uniform(seed, index, 1, (1, 6, 6)), size=(size, size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
    grain = _uniform(seed, index, 2, (3, size, size)) - 0.5
    background = torch.lerp(bg[0], bg[1], blobs) + 0.12 * grain

    # Foreground: a saturated colour, striped across the object's own axis for the striped classes.
    fg = _hsv_to_rgb(scene[:, 10], 0.55 + 0.45 * scene[:, 11], 0.75 + 0.25 * scene[:, 12]).view(n, 3, 1, 1)
    stripes = torch.sin(spread(13, 2.0, 3.5) * math.pi * u + spread(14, 0, 2 * math.pi)) > 0
    dark = (texture_id.view(-1, 1, 1) == 1) & stripes
    foreground = torch.where(dark.unsqueeze(1), 0.3 * fg, fg) + 0.06 * grain

    imgs = torch.where(masks.unsqueeze(1), foreground, background)
    imgs = (imgs.clamp(0, 1) * 255).round().to(torch.uint8)
    return imgs, masks, labels


class SyntheticShapes(torch.utils.data.Dataset):
    """``len(CLASS_NAMES)`` classes (shape x texture; colour, position, scale and rotation are nuisances),
    balanced (label = index mod classes), deterministic: image i is a pure function of (split, i, size).

    Rendered once, vectorised, on first use and kept in memory (15 MB for 5000 images of 32 px).
    """

    num_classes = len(CLASS_NAMES)
    classes = CLASS_NAMES
    augmented_on_cpu = False

    def __init__(self, length: int = 5000, img_size: int = 32, train: bool = True, seed: int = 0):
        if length < 1 or img_size < 4:
            raise DatasetError(f"synthetic: need length >= 1 and img_size >= 4, got {length}, {img_size}")
        self.length, self.img_size = length, img_size
        # Train and test are disjoint streams of the same distribution.
        self.seed = 2 * seed + (0 if train else 1)
        self._cache = None

    def _materialize(self):
        if self._cache is None:
            chunks = [render_synthetic(range(lo, min(lo + 1024, self.length)), self.img_size, self.seed)
                      for lo in range(0, self.length, 1024)]
            self._cache = tuple(torch.cat(parts) for parts in zip(*chunks))
        return self._cache

    @property
    def images(self) -> torch.Tensor:
        return self._materialize()[0]

    @property
    def labels(self) -> torch.Tensor:
        return self._materialize()[2]

    def object_mask(self, i: int) -> torch.Tensor:
        """Ground-truth object mask of image i: (H, W) bool, True on the object."""
        return self._materialize()[1][i]

    def object_masks(self) -> torch.Tensor:
        return self._materialize()[1]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        images, _, labels = self._materialize()
        return images[i], int(labels[i])


# ----------------------------------------------------------------------------------------------------
# CIFAR (python-pickle folders) and ImageFolder

class TensorImages(torch.utils.data.Dataset):
    """A dataset held as one uint8 (N, C, H, W) tensor and its labels (CIFAR)."""

    augmented_on_cpu = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


_CIFAR = {
    # name: (folder inside an outer directory, train files, test files, label key, meta file, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as err:  # a truncated or foreign file can raise nearly anything
        raise DatasetError(f"{name}: {path} is not a CIFAR python pickle "
                           f"({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{name}: {path} is not a CIFAR python pickle (holds a {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar(name: str, path: str, train: bool) -> TensorImages:
    inner, train_files, test_files, label_key, meta_file, names_key = _CIFAR[name]
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name}: {root} is not a directory")
    if (root / inner).is_dir():
        root = root / inner
    files = train_files if train else test_files
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"{name}: {root} lacks {', '.join(missing)} (expected the python-pickle "
                           f"folder {inner}/ from https://www.cs.toronto.edu/~kriz/cifar.html)")
    num_classes = 10 if name == "cifar10" else 100
    images, labels = [], []
    for f in files:
        batch = _unpickle(root / f, name)
        if "data" not in batch or label_key not in batch:
            raise DatasetError(f"{name}: {root / f} has no 'data'/'{label_key}' entries")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{name}: {root / f} 'data' must be uint8 (N, 3072), "
                               f"got {data.dtype} {data.shape}")
        try:
            label = np.asarray(batch[label_key])
        except (TypeError, ValueError):  # ragged lists and the like
            label = np.asarray([None])
        if label.ndim == 1 and label.size == 0:  # np.asarray([]) is float64
            label = label.astype(np.int64)
        if label.ndim != 1 or label.dtype.kind not in "iu":
            raise DatasetError(f"{name}: {root / f} '{label_key}' must be a list of integer class ids")
        if label.shape[0] != data.shape[0]:
            raise DatasetError(f"{name}: {root / f} has {data.shape[0]} images but {label.shape[0]} labels")
        if label.size and not (0 <= label.min() and label.max() < num_classes):
            raise DatasetError(f"{name}: {root / f} has labels outside [0, {num_classes}): "
                               f"{label.min()}..{label.max()}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    classes = [str(i) for i in range(num_classes)]
    if (root / meta_file).is_file():
        meta = _unpickle(root / meta_file, name)
        names = meta.get(names_key, classes)
        if (not isinstance(names, (list, tuple)) or len(names) != num_classes
                or not all(isinstance(n, (str, bytes)) for n in names)):
            raise DatasetError(f"{name}: {root / meta_file} '{names_key}' must list {num_classes} "
                               f"class names")
        classes = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    return TensorImages(torch.cat(images), torch.cat(labels), classes)


def _tiny_imagenet_val(root: Path, class_to_idx: dict) -> list[tuple[str, int]] | None:
    """Tiny-ImageNet ships val/ as images/ + val_annotations.txt instead of class folders."""
    annotations = root / "val_annotations.txt"
    if not annotations.is_file():
        return None
    samples = []
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in class_to_idx:
            samples.append((str(root / "images" / parts[0]), class_to_idx[parts[1]]))
    return samples


def load_imagefolder(path: str, train: bool, img_size: int, augment: bool | None = None,
                     crop_scale_min: float = 0.2):
    """``PATH/train`` (or ``PATH`` itself, holding the class folders) when ``train``, else ``PATH/val``
    (``PATH/train`` or ``PATH`` when there is no val/: the test split is then the training images);
    ``augment`` (default: ``train``): MAE's random resized crop (areas ``crop_scale_min`` to 1) and flip,
    else the resize and centre crop of evaluation. Class ids are those of the training folders, val/'s
    matched by class name."""
    from torchvision import datasets
    from torchvision.transforms import v2

    augment = train if augment is None else augment
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"imagefolder: {root} is not a directory")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_val and not has_train:  # PATH itself would be the training set, with val/ one of its classes
        raise DatasetError(f"imagefolder: {root} has val/ but no train/ (expected {root}/train/<class>/...)")
    train_root = root / "train" if has_train else root
    folder = root / "val" if has_val and not train else train_root
    if augment:
        # MAE's recipe; on the CPU workers because decoding happens there anyway.
        transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0),
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                                v2.RandomHorizontalFlip()])
    else:
        transform = v2.Compose([v2.PILToTensor(), v2.Resize(round(img_size * 256 / 224), antialias=True),
                                v2.CenterCrop(img_size)])
    try:
        classes_from = datasets.ImageFolder(str(train_root))
        dataset = classes_from if folder == train_root else datasets.ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"imagefolder: {err}") from None
    if folder != train_root:
        val = _tiny_imagenet_val(folder, classes_from.class_to_idx)
        if val is not None:
            if not val:
                raise DatasetError(f"imagefolder: {folder}/val_annotations.txt names no known class")
        else:  # val/'s own folder order numbers its classes: renumber them as train/'s, by name
            unknown = sorted(set(dataset.classes) - set(classes_from.class_to_idx))
            if unknown:
                raise DatasetError(f"imagefolder: {folder} has classes that {train_root} lacks: "
                                   f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
            val = [(p, classes_from.class_to_idx[dataset.classes[t]]) for p, t in dataset.samples]
        dataset.samples = dataset.imgs = val
        dataset.targets = [t for _, t in val]
        dataset.classes, dataset.class_to_idx = classes_from.classes, classes_from.class_to_idx
    dataset.transform = transform
    dataset.num_classes = len(dataset.classes)
    dataset.augmented_on_cpu = augment
    return dataset


def build_dataset(spec: str, train: bool = True, img_size: int | None = None, seed: int = 0,
                  augment: bool | None = None, crop_scale_min: float = 0.2):
    """The dataset named by ``spec`` (see the module docstring); ``img_size`` sets the synthetic images'
    size and the ImageFolder crop (default 32 and 224); CIFAR images stay 32 px (resampled on the device).
    ``augment`` (default: ``train``) gives an ImageFolder the training crops and flips on the CPU; the
    evaluation reads the train split without them (the other datasets are augmented on the device, by the
    trainer, and ignore it; ``crop_scale_min`` is the ImageFolder crops' smallest area fraction).
    """
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name == "synthetic":
        length = 5000
        if arg:
            try:
                length = int(arg)
            except ValueError:
                raise DatasetError(f"synthetic:N needs an integer image count, got {arg!r}") from None
        return SyntheticShapes(length if train else max(1, length // 5), img_size or 32, train, seed)
    if name in _CIFAR:
        if not arg:
            raise DatasetError(f"{name} needs a path: --data {name}:PATH")
        return load_cifar(name, arg, train)
    if name == "imagefolder":
        if not arg:
            raise DatasetError("imagefolder needs a path: --data imagefolder:PATH")
        return load_imagefolder(arg, train, img_size or 224, augment, crop_scale_min)
    raise DatasetError(f"unknown dataset {spec!r}: use synthetic[:N], cifar10:PATH, cifar100:PATH "
                       "or imagefolder:PATH")


# ----------------------------------------------------------------------------------------------------
# Batching

def dataset_labels(dataset) -> torch.Tensor:
    """(N,) int64 class ids of a ``build_dataset`` dataset: its ``labels`` or an ImageFolder's ``targets``."""
    labels = getattr(dataset, "labels", None)
    return torch.as_tensor(dataset.targets if labels is None else labels, dtype=torch.long)


def class_paired_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(len(labels))`` read as consecutive pairs of the same class: each class
    shuffled and cut into pairs, the pairs shuffled. A class with an odd count leaves one index, paired with
    the next such class's (at most one pair per two odd classes crosses classes); an odd total puts the
    last one alone at the end."""
    perm = torch.randperm(labels.shape[0], generator=generator)
    sorted_labels, order = torch.sort(labels[perm], stable=True)
    by_class = perm[order]  # each class in random order
    # odd ones out (the last of each odd-count class) to the end, so the rest pairs within its class
    _, inverse, counts = torch.unique_consecutive(sorted_labels, return_inverse=True, return_counts=True)
    rank_in_class = torch.arange(labels.shape[0]) - (counts.cumsum(0) - counts)[inverse]
    count = counts[inverse]
    odd_one = (count % 2 == 1) & (rank_in_class == count - 1)
    by_class = torch.cat([by_class[~odd_one], by_class[odd_one]])
    pairs = by_class[: labels.shape[0] // 2 * 2].view(-1, 2)
    pairs = pairs[torch.randperm(pairs.shape[0], generator=generator)]
    return torch.cat([pairs.flatten(), by_class[pairs.numel():]])


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a per-epoch shuffle, starting ``skip`` samples in (exact mid-epoch resume).

    The order is a pure function of (seed, epoch), as ``DistributedSampler``'s, so resuming needs no
    sampler state; the tail that does not fill a whole global batch is dropped (MAE's drop_last).

    ``pair_labels`` (N,) integer class ids: the shuffle is ``class_paired_order`` instead, and each rank
    takes whole consecutive runs of ``batch_size``, so an even batch is made of same-class pairs: i-MAE's
    ``sample_partners`` then finds a same-class partner for every sample in the batch (with 1000 classes
    and batches of 256 drawn uniformly, only about a fifth of the samples would have one).
    """

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 pair_labels: torch.Tensor | None = None):
        for name, value, low in (("length", length, 0), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if rank >= world_size:  # rank 5 of 2 took a share overlapping rank 1's
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip = 0, 0
        self.num_batches = length // (batch_size * world_size)
        if self.num_batches == 0:
            raise DatasetError(f"the dataset has {length} images, fewer than one global batch "
                               f"({batch_size} x {world_size} processes)")
        if pair_labels is not None:
            pair_labels = torch.as_tensor(pair_labels)
            if pair_labels.shape != (length,) or pair_labels.is_floating_point() or pair_labels.is_complex():
                raise DatasetError(f"pair_labels must be ({length},) integer class ids, got "
                                   f"{tuple(pair_labels.shape)} {pair_labels.dtype}")
            pair_labels = pair_labels.long()
        self.pair_labels = pair_labels

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.num_batches:  # past the end the length went negative
            raise ValueError(f"skip_batches must be in [0, {self.num_batches}], got {skip_batches}")
        self.epoch, self.skip = epoch, skip_batches * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        used = self.num_batches * self.batch_size * self.world_size
        if self.pair_labels is None:
            order = torch.randperm(self.length, generator=g)[:used]
            mine = order[self.rank::self.world_size]
        else:
            # global batch i is [i W B, (i + 1) W B); this rank's part of it, B consecutive entries
            order = class_paired_order(self.pair_labels, g)[:used]
            mine = order.view(self.num_batches, self.world_size, self.batch_size)[:, self.rank].flatten()
        return iter(mine[self.skip:].tolist())

    def __len__(self) -> int:
        return self.num_batches * self.batch_size - self.skip


class TensorBatches:
    """Batches of an in-memory uint8 dataset by plain indexing (no per-item Python, no collate).

    ``device``: where the dataset lives (the GPU when it fits: one copy, then every batch is a gather).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: EpochSampler, device=None):
        self.images = images if device is None else images.to(device)
        self.labels = labels if device is None else labels.to(device)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.images.device)
        for batch in order.split(self.sampler.batch_size):
            yield self.images[batch], self.labels[batch]


class SeededKeys(torch.utils.data.Sampler):
    """``sampler``'s indices, each paired with a seed that is a pure function of (seed, epoch, index)."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self):
        # (seed, epoch) in the high 31 bits, the index in the low 32: distinct for any dataset size
        base = ((self.sampler.seed * 100_003 + self.sampler.epoch) % 2**31) << 32
        return ((i, base | i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededItems(torch.utils.data.Dataset):
    """``dataset[i]`` with its random transforms drawn from a generator seeded per item: ``(i, seed)`` keys
    (from ``SeededKeys``) give every image of an epoch the same crop whichever worker loads it, and
    whether or not the run was resumed mid-epoch (the workers' own streams restart on a resume); only
    the CPU generator is seeded, and restored afterwards. Plain ``i`` keys load as the dataset itself
    does. An unreadable image raises a DatasetError naming its file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, augmented_on_cpu, ...: the wrapped dataset's
        # not its dunders: a wrapped __getitems__ (Subset's) would take the (i, seed) keys unseeded
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _load(self, i):
        try:
            return self.dataset[i]
        except Exception as err:
            from PIL import Image

            # PIL's UnidentifiedImageError, a truncated or vanished file, an image too large to decode
            if not isinstance(err, (OSError, Image.DecompressionBombError)):
                raise
            path = getattr(self.dataset, "samples", None)
            name = path[i][0] if path is not None else f"item {i}"
            raise DatasetError(f"cannot read image {name}: {err}") from None

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self._load(key)
        i, seed = key
        # torch.manual_seed would also reseed (and never restore) the CUDA generators the masks draw from
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._load(i)


def error_line(err: Exception) -> str:
    """The message of a DatasetError, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    prefix = f"{DatasetError.__module__}.{DatasetError.__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def make_loader(dataset, sampler: EpochSampler, num_workers: int, device: torch.device, seed: int = 0):
    """In-memory datasets batch by indexing (on the device when it holds them in under a quarter of its
    memory); others go through a ``DataLoader`` with pinned memory, their random transforms seeded per
    item (``SeededItems``) so that a resumed run loads the images it would have loaded."""
    if isinstance(dataset, (SyntheticShapes, TensorImages)):
        home = None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if dataset.images.numel() < free // 4:
                home = device
        return TensorBatches(dataset.images, dataset.labels, sampler, home)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        SeededItems(dataset), batch_size=sampler.batch_size, sampler=SeededKeys(sampler),
        num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True, generator=generator,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


# ----------------------------------------------------------------------------------------------------
# Device-side augmentation and normalisation

def _check_uint8_batch(imgs) -> None:
    # float images in [0, 1] were divided by 255 once more and came out nearly constant
    if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.dim() != 4:
        what = f"{imgs.dtype} of shape {tuple(imgs.shape)}" if isinstance(imgs, torch.Tensor) else type(imgs)
        raise TypeError(f"imgs must be a uint8 (B, C, H, W) batch, got {what}")


def normalize_batch(imgs: torch.Tensor, img_size: int | None = None, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float32 normalised, resized to ``img_size`` when it differs."""
    _check_uint8_batch(imgs)
    x = imgs.float().div_(255)
    if img_size is not None and x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_resized_crop_params(batch: int, height: int, width: int, generator: torch.Generator,
                               scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """Crop boxes (B, 4) = (x0, y0, w, h) in pixels, drawn as torchvision's RandomResizedCrop does
    (area fraction ~ U(scale), log aspect ~ U(log ratio), first of ``attempts`` that fits, else the
    whole image), all samples at once. Drawn on the CPU so a run's crops do not depend on the device."""
    area = height * width * torch.empty(batch, attempts).uniform_(*scale, generator=generator)
    log_r = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = torch.sqrt(area * torch.exp(log_r))
    h = torch.sqrt(area / torch.exp(log_r))
    fits = (w <= width) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)
    rows = torch.arange(batch)
    ok = fits[rows, first]
    w = torch.where(ok, w[rows, first], torch.tensor(float(width)))
    h = torch.where(ok, h[rows, first], torch.tensor(float(height)))
    u = torch.rand(batch, 2, generator=generator)
    x0 = u[:, 0] * (width - w)
    y0 = u[:, 1] * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def augment_batch(imgs: torch.Tensor, img_size: int, generator: torch.Generator, scale=(0.2, 1.0),
                  flip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """MAE's augmentation on a uint8 batch where it lives: RandomResizedCrop + horizontal flip as one
    bilinear ``grid_sample`` per batch, then normalisation. Returns float32 (B, C, img_size, img_size)."""
    _check_uint8_batch(imgs)
    b, _, height, width = imgs.shape
    box = random_resized_crop_params(b, height, width, generator, scale)
    flips = (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    x0, y0, w, h = box.unbind(1)
    # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges at +-1).
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = (w / width) * torch.where(flips, -1.0, 1.0)
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    theta = theta.to(imgs.device)
    grid = F.affine_grid(theta, [b, imgs.shape[1], img_size, img_size], align_corners=False)
    x = F.grid_sample(imgs.float().div_(255), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised float images back to [0, 1] for pictures."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# i-MAE pairing

def sample_partners(labels: torch.Tensor, same_prob: float, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """(B,) partner index per sample, never itself (unless B == 1): with probability ``same_prob`` a sample
    of the same class, else one of another class, uniformly; when the batch holds no such sample, any
    other sample. Random draws on ``generator``'s device (CPU by default); result on ``labels``' device."""
    if isinstance(same_prob, bool) or not isinstance(same_prob, numbers.Real):  # numpy scalars too
        raise TypeError(f"same_prob must be a number in [0, 1], got {type(same_prob).__name__}")
    same_prob = float(same_prob)
    if not 0.0 <= same_prob <= 1.0:
        raise ValueError(f"same_prob must be in [0, 1], got {same_prob}")
    if (not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        raise TypeError(f"labels must be an integer tensor of class ids, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty (B,) tensor, got shape {tuple(labels.shape)}")
    device = labels.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    labels = labels.to(gen_device)
    b = labels.shape[0]
    other = ~torch.eye(b, dtype=torch.bool, device=gen_device)
    same = (labels[:, None] == labels[None, :]) & other
    want_same = torch.rand(b, generator=generator, device=gen_device) < same_prob
    candidates = torch.where(want_same[:, None], same, other & ~same)
    candidates = torch.where(candidates.any(1, keepdim=True), candidates, other)
    if b == 1:
        candidates = torch.ones(1, 1, dtype=torch.bool, device=gen_device)
    # Uniform among candidates: the argmax of random scores restricted to them.
    scores = torch.rand(b, b, generator=generator, device=gen_device).masked_fill(~candidates, -1.0)
    return scores.argmax(dim=1).to(device)


def kmeans(feats: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Cluster ids (N,) of the rows of ``feats`` (N, D) under cosine k-means (k-means++ seeding): the
    stand-in labels for semantic pairing on unlabelled data."""
    if feats.dim() != 2 or feats.shape[0] == 0:
        raise ValueError(f"feats must be a non-empty (N, D) tensor, got shape {tuple(feats.shape)}")
    for name, value, low in (("k", k, 1), ("iters", iters, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers too
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not bool(torch.isfinite(feats).all()):  # NaN cosines would put every row in cluster 0
        raise ValueError("feats must be finite: found NaN or inf")
    x = F.normalize(feats.float(), dim=1)
    n = x.shape[0]
    k, iters = min(int(k), n), int(iters)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    first = torch.randint(n, (1,), generator=generator, device=gen_device).to(x.device)
    centers = x[first]
    for _ in range(1, k):
        dist = (1 - x @ centers.T).amin(dim=1).clamp_min(0)
        weights = dist if dist.sum() > 0 else torch.ones_like(dist)
        pick = torch.multinomial(weights.to(gen_device), 1, generator=generator).to(x.device)
        centers = torch.cat([centers, x[pick]])
    for _ in range(iters):
        assign = (x @ centers.T).argmax(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centers = torch.where(counts > 0, F.normalize(sums, dim=1), centers)
    return (x @ centers.T).argmax(dim=1)


def default_workers(world_size: int = 1) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, world_size) - 1))
