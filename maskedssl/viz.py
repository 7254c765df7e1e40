"""Pictures of a run, as PNG: reconstructions, masks (random vs informed, with the bi-partition and the
ground-truth objects when the data has them) and loss curves.

Figures are drawn on matplotlib's ``Figure`` directly (the Agg canvas), never through pyplot, so nothing
here needs a display or changes the process's matplotlib backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from .data import normalize_batch, pixel_stats, sample_partners

# overlay colours (RGB)
MASK_GREY = 0.5
FOREGROUND_TINT = torch.tensor([1.0, 0.15, 0.1])
OBJECT_TINT = torch.tensor([0.1, 0.9, 0.2])


def image_grid(rows: dict[str, torch.Tensor], path: Path, title: str | None = None) -> Path:
    """One row per entry of ``rows`` (label -> (B, C, H, W) in [0, 1]), one column per sample."""
    labels = list(rows)
    n = rows[labels[0]].shape[0]
    fig = Figure(figsize=(1.3 * n + 1.2, 1.3 * len(labels) + (0.4 if title else 0)), dpi=100)
    axes = fig.subplots(len(labels), n, squeeze=False)
    for r, label in enumerate(labels):
        imgs = rows[label].detach().float().cpu().clamp(0, 1)
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def patch_map(patch_values: torch.Tensor, patch_size: int, size: int) -> torch.Tensor:
    """(B, L) per-patch values -> (B, 1, size, size) pixels (each patch one constant block)."""
    grid = size // patch_size
    blocks = patch_values.float().view(-1, 1, grid, grid)
    return F.interpolate(blocks, scale_factor=patch_size, mode="nearest")


def tint(imgs: torch.Tensor, region: torch.Tensor, color: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Blend ``color`` into ``imgs`` (B, 3, H, W) where ``region`` (B, 1, H, W) is set."""
    color = color.to(imgs.device).view(1, 3, 1, 1)
    return torch.where(region.bool(), (1 - alpha) * imgs + alpha * color, imgs)


def loss_curve(metrics: Path, path: Path) -> Path | None:
    """Every logged loss (log scale) and the learning rate against epochs, from ``metrics.jsonl``."""
    if not metrics.is_file():
        return None
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash: the picture should not end the run
            continue
        if isinstance(record, dict) and record.get("kind") == "train" and "epoch" in record:
            records.append(record)
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(8, 3.2), dpi=100)
    ax_loss, ax_lr = fig.subplots(1, 2)
    skip = {"kind", "epoch", "step", "lr", "img_per_s", "partner_same_class"}
    for key in dict.fromkeys(k for r in records for k in r if k not in skip):  # every loss logged
        ax_loss.plot(epochs, [r.get(key, float("nan")) for r in records], label=key, lw=1.2)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(epochs, [r.get("lr", float("nan")) for r in records], color="tab:gray")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_title("learning rate")
    fig.tight_layout()
    fig.savefig(path)
    return path


@torch.no_grad()
def write_pictures(model: torch.nn.Module, batch: dict, out: Path, method: str, tag: str = "",
                   seed: int = 0) -> dict[str, Path]:
    """The run's pictures under ``out``: ``reconstruction{tag}.png``, ``masks{tag}.png`` and ``loss.png``.

    ``batch``: ``imgs`` uint8 (B, C, H, W), ``labels`` (B,), ``object_masks`` (B, H, W) bool or None.
    Masks are drawn on their own seed, so two checkpoints' pictures show the same random masks.
    """
    out = Path(out)
    device = next(model.parameters()).device
    x = normalize_batch(batch["imgs"].to(device), model.img_size, *pixel_stats(model))
    was_training = model.training
    model.eval()
    try:
        torch.manual_seed(seed)
        recon_path, masks_path = out / f"reconstruction{tag}.png", out / f"masks{tag}.png"
        paths = {"reconstruction": _reconstructions(model, x, batch["labels"], method, recon_path),
                 "masks": _masks(model, x, batch.get("object_masks"), method, masks_path)}
    finally:
        model.train(was_training)
    curve = loss_curve(out / "metrics.jsonl", out / "loss.png")
    if curve is not None:
        paths["loss"] = curve
    return paths


def _reconstructions(model, x: torch.Tensor, labels: torch.Tensor, method: str, path: Path) -> Path:
    if method == "imae":
        # partners from other classes (so the two images differ visibly), the subordinate at weight 0.3
        partner = sample_partners(labels.cpu(), 0.0, torch.Generator().manual_seed(0)).to(x.device)
        pics = model.reconstruct(x, partner=partner, lam=0.3)
        rows = {"mixture": pics["mixture"], "masked": pics["masked"], "subordinate": pics["sub"],
                "recon. sub.": pics["recon_sub"], "dominant": pics["dom"], "recon. dom.": pics["recon_dom"]}
        return image_grid(rows, path, "i-MAE: one masked mixture, both images reconstructed")
    progress = 1.0 if method == "sgmae" else 0.0
    pics = model.reconstruct(x, progress=progress)
    kind = "informed" if method == "sgmae" else "random"
    rows = {"input": pics["input"], f"masked ({kind})": pics["masked"],
            "reconstruction": pics["reconstruction"]}
    return image_grid(rows, path, f"{method}: reconstruction of masked patches")


def _masks(model, x: torch.Tensor, object_masks: torch.Tensor | None, method: str, path: Path) -> Path:
    size, p = model.img_size, model.patch_size
    shown = model.reconstruct(x) if method != "imae" else None
    imgs = shown["input"] if shown is not None else model.to_pixels(model.patch_rows(x))
    random_mask = model(x, progress=0.0).mask
    rows = {"input": imgs, "random mask": torch.where(patch_map(random_mask, p, size) > 0, MASK_GREY, imgs)}
    if method == "sgmae":
        informed = model(x, progress=1.0)
        rows["informed mask"] = torch.where(patch_map(informed.mask, p, size) > 0, MASK_GREY, imgs)
        fg = patch_map(informed.extras["ncut"].foreground, p, size)
        rows["bi-partition"] = tint(imgs, fg, FOREGROUND_TINT)
    if object_masks is not None:
        obj = object_masks.to(imgs.device).unsqueeze(1).float()
        if obj.shape[-1] != size:
            obj = F.interpolate(obj, size=(size, size), mode="nearest")
        rows["object (truth)"] = tint(imgs, obj, OBJECT_TINT)
    title = "masks: random vs informed, with the normalized-cut foreground" if method == "sgmae" else "masks"
    return image_grid(rows, path, title)
