"""The in-memory image set every small dataset becomes: one uint8 tensor (N, C, H, W) and labels."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["ImageDataset", "IMAGE_EXTENSIONS", "require_labels"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """A whole dataset held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), C in {1, 3}.
        labels: int64 tensor (N,); -1 for unlabelled items.
        classes: class names, index = label ([] if unlabelled).
        name: dataset name, e.g. "cifar10/train".
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(
                f"{self.name}: images must be uint8 (N, C, H, W) with C in (1, 3), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name}: labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        """Number of images N."""
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """Return (image uint8 (C, H, W), label int (-1 if unlabelled), instance index i)."""
        i = int(i)
        if i < 0:
            i += len(self)
        return self.images[i], int(self.labels[i]), i

    def to(self, device: torch.device | str) -> "ImageDataset":
        """Return a copy whose images and labels live on `device`."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled dataset)."""
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, images={tuple(self.images.shape)}, "
            f"num_classes={self.num_classes}, device={self.images.device})"
        )


def require_labels(ds: ImageDataset, split: str, what: str) -> None:
    """ConfigError unless every item of `ds` (split `split`) has a label and there are at least two
    classes; `what` names the user."""
    if ds.num_classes == 0 or (ds.labels < 0).any():
        raise ConfigError(f"split '{split}' ({ds.name}) has no labels (unlabelled items, label -1): {what} "
                          "needs a labelled split (set eval.train_split / eval.test_split)")
    if ds.num_classes == 1:
        raise ConfigError(f"split '{split}' ({ds.name}) has one class only: {what} would score 1.0 by construction; "
                          "use a split with at least two classes (for a folder: one sub-folder per class)")
