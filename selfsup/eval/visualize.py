"""Pictures of a representation: a 2-D map of the features coloured by class (t-SNE, UMAP or PCA)
and a nearest-neighbour grid (query images and their closest training images).

Plots use matplotlib's object API with the Agg canvas, so no display or pyplot state is needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..atomic import replacing
from ..errors import ConfigError

METHODS_2D = ("tsne", "umap", "pca")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def reduce_2d(feats: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of the rows of `feats` (N, D) by t-SNE, UMAP (needs umap-learn) or PCA.

    t-SNE and UMAP first project to 50 dimensions with PCA (faster, the usual practice)."""
    feats = np.asarray(feats, dtype=np.float32)
    n = feats.shape[0]
    if method not in METHODS_2D:
        raise ConfigError(f"unknown map method '{method}'. Choose one of: {', '.join(METHODS_2D)}")
    if n < 3:
        raise ConfigError(f"a 2-D map needs at least 3 points, got {n}")
    from sklearn.decomposition import PCA

    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(feats)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("--method umap needs the umap-learn package: pip install umap-learn "
                              "(or use --method tsne or --method pca)") from None
    if feats.shape[1] > 50 and n > 50:
        feats = PCA(n_components=50, random_state=seed).fit_transform(feats)
    if method == "umap":
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(feats)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (n - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(feats)


def _class_colours(num_classes: int):
    from matplotlib import colormaps

    name = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
    cmap = colormaps[name]
    return [cmap(i if name != "turbo" else i / max(num_classes - 1, 1)) for i in range(num_classes)]


def plot_map(xy: np.ndarray, labels, classes: list[str], path: Path, title: str = "") -> Path:
    """Scatter plot PNG of 2-D points `xy` coloured by label, with a legend of class names
    (a colour bar of class indices beyond 20 classes)."""
    labels = np.asarray(labels)
    fig = _figure(8.5, 6.5)
    ax = fig.add_subplot()
    if not labels.size or labels.max() < 0:   # unlabelled images: one colour, no legend
        ax.scatter(xy[:, 0], xy[:, 1], s=7, color="tab:blue", linewidths=0, alpha=0.85)
        return _save(fig, ax, title, path)
    colours = _class_colours(max(len(classes), int(labels.max()) + 1))
    for c in np.unique(labels):
        m = labels == c
        name = classes[c] if 0 <= c < len(classes) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=7, color=colours[c], label=name, linewidths=0, alpha=0.85)
    if len(colours) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2.5, frameon=False)
    else:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(Normalize(0, len(colours) - 1), colormaps["turbo"])
        fig.colorbar(sm, ax=ax, label="class index")
    return _save(fig, ax, title, path)


def _save(fig, ax, title: str, path: Path) -> Path:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with replacing(path) as tmp:   # never half a PNG
        fig.savefig(tmp, format="png")
    return Path(path)


def pick_queries(labels: Tensor, n: int) -> Tensor:
    """Deterministic query indices: the first image of each class in class order, then (with fewer
    classes than `n`) the second of each, and so on; at most `n`, at most len(labels)."""
    labels = labels.cpu().to(torch.int64)
    order = torch.argsort(labels, stable=True)                         # grouped by class, in split order
    grouped = labels[order]
    within = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)   # rank inside its class
    key = within * (int(grouped.max()) + 2) + (grouped + 1) if len(order) else within
    return order[torch.argsort(key, stable=True)][:n]


def nearest_neighbours(query: Tensor, bank: Tensor, k: int) -> Tensor:
    """Indices (Q, k) of the `k` rows of `bank` most cosine-similar to each row of `query`."""
    q = torch.nn.functional.normalize(query.float(), dim=1)
    b = torch.nn.functional.normalize(bank.float(), dim=1)
    return (q @ b.T).topk(min(k, b.shape[0]), dim=1).indices


def _show(ax, image: Tensor) -> None:
    img = image.cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_neighbours(query_images: Tensor, query_labels: Tensor, nb_images: Tensor, nb_labels: Tensor,
                    classes: list[str], path: Path, title: str = "") -> Path:
    """Grid PNG: one row per query (uint8 image C x H x W), the query then its neighbours; each
    neighbour framed green when its label equals the query's, red otherwise; class names above.
    Unlabelled images (label -1) are framed grey, without names.

    nb_images: (Q, k, C, H, W) uint8; nb_labels: (Q, k)."""
    q, k = nb_labels.shape

    def name(y):
        return classes[y] if 0 <= y < len(classes) else "" if y < 0 else str(y)

    fig = _figure(1.15 * (k + 1) + 0.3, 1.3 * q + 0.5)
    axes = fig.subplots(q, k + 1, squeeze=False)
    for r in range(q):
        yq = int(query_labels[r])
        ax = axes[r, 0]
        _show(ax, query_images[r])
        ax.set_title(f"query: {name(yq)}" if yq >= 0 else "query", fontsize=7, fontweight="bold")
        for s in ax.spines.values():
            s.set(color="black", linewidth=2.5)
        for j in range(k):
            ax = axes[r, j + 1]
            y = int(nb_labels[r, j])
            _show(ax, nb_images[r, j])
            ax.set_title(name(y), fontsize=7, color="black" if y == yq else "firebrick")
            frame = "grey" if yq < 0 else "limegreen" if y == yq else "red"
            for s in ax.spines.values():
                s.set(color=frame, linewidth=3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with replacing(path) as tmp:   # never half a PNG
        fig.savefig(tmp, format="png")
    return Path(path)


def visualize_run(encoder, cfg, ds, bank_ds, method: str, max_points: int | None, n_queries: int,
                  n_neighbours: int, out: Path, device, amp, split: str) -> dict:
    """`selfsup visualize`: the 2-D map of split `split` (`ds`, at most `max_points` images) and the grid of
    `n_queries` of its images with their `n_neighbours` nearest images of the bank split (`bank_ds`,
    eval.train_split; a query is never its own neighbour). Labelled images are coloured and framed by
    class, with the neighbours' precision (the share of neighbours of the query's class); unlabelled
    ones (label -1: data.labels=none, a flat folder) are drawn plain and the precision is None.
    Writes map-<method>-<split>.png and neighbours-<split>.png in `out`; returns their paths and figures.
    `amp`: the autocast dtype of the features, or None."""
    from .embed import subset_indices
    from .features import extract_features

    def features(images):
        return extract_features(encoder, images, cfg.eval.batch_size, device, cfg.data.image_size, amp)

    labelled = bool(len(ds.labels)) and int(ds.labels.min()) >= 0 and int(bank_ds.labels.min()) >= 0
    sub = subset_indices(len(ds), max_points)
    feats = features(ds.images[sub.to(ds.images.device)]).cpu()
    xy = reduce_2d(feats.numpy(), method)
    name = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}[method]
    title = f"{name} of {split} features ({len(sub)} points, {cfg.method}, {cfg.data.name})"
    out.mkdir(parents=True, exist_ok=True)
    map_path = plot_map(xy, ds.labels[sub].cpu().numpy(), ds.classes, out / f"map-{method}-{split}.png", title)

    queries = pick_queries(ds.labels, n_queries)
    same = bank_ds is ds
    nb = nearest_neighbours(features(ds.images[queries.to(ds.images.device)]), features(bank_ds.images),
                            n_neighbours + same).cpu()
    if same:   # a query from the bank's split is its own nearest neighbour: leave it out
        nb = torch.stack([row[row != i][:n_neighbours] for row, i in zip(nb, queries)])
    qy, ny = ds.labels.cpu()[queries], bank_ds.labels.cpu()[nb]
    frames = "green: same class, red: other" if labelled else "unlabelled images"
    nb_path = plot_neighbours(ds.images.cpu()[queries], qy, bank_ds.images.cpu()[nb], ny, ds.classes,
                              out / f"neighbours-{split}.png",
                              f"{split} queries and their nearest {cfg.eval.train_split} images (cosine, {frames})")
    return {"map": str(map_path), "neighbours": str(nb_path), "method": method, "split": split,
            "points": len(sub),
            "neighbour_precision": (ny == qy[:, None]).float().mean().item() if labelled else None}
