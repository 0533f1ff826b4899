"""The splits a config names, loaded as the trainer and the evaluations use them.

A split is an in-memory :class:`~selfsup.data.images.ImageDataset` (small sets), or, when the caller
asks for a stream (training with ``data.stream``: ``config.uses_stream``), a file-backed
:class:`~selfsup.data.files.FileImageSet` read by the loader's workers. :func:`pixels` is what
feature extraction reads from either.
"""
from __future__ import annotations

from omegaconf import DictConfig

from ..errors import ConfigError
from .datasets import build_dataset
from .files import STREAMABLE, open_imagefolder, open_imagenet_zip

__all__ = ["load_split", "load_eval_data", "pixels"]


def load_split(cfg: DictConfig, split: str, stream: bool = False):
    """The dataset `cfg.data.name`, split `split`, with the data.* options: an in-memory ImageDataset,
    or with `stream` a file-backed FileImageSet (selfsup.data.files) read by the loader's workers."""
    d = cfg.data
    if stream:
        dset = open_imagenet_zip(d.root, split) if d.name == "imagenet-zip" else \
            open_imagefolder(d.root, split, d.file_list, d.index_cache, d.labels)
        dset.workers = d.num_workers
        return dset
    extra = {"num_workers": d.num_workers} if d.name in STREAMABLE and d.num_workers else {}
    if d.name == "imagefolder":
        extra.update(file_list=d.file_list, index_cache=d.index_cache, labels=d.labels)
    return build_dataset(d.name, split, root=d.root, download=d.download, image_size=d.image_size,
                         on_error=d.on_error, **extra)


def load_eval_data(cfg: DictConfig, train_ds=None, stream: bool = False):
    """(train, test) labelled datasets of the kNN monitor and the evaluations (eval.train_split,
    eval.test_split); reuses `train_ds` when it is the same split. A ConfigError for data.labels=none:
    the label protocols need labelled images."""
    if cfg.data.labels == "none":
        raise ConfigError("this config's images are unlabelled (data.labels=none): kNN, linear and fine-tune "
                          "evaluation need labels. Add data.labels=auto data.root=DIR for a labelled folder (one "
                          "sub-folder per class, in DIR/train and DIR/test), or data.name=... for a labelled dataset")
    train = train_ds if (train_ds is not None and cfg.eval.train_split == cfg.data.train_split) else \
        load_split(cfg, cfg.eval.train_split, stream)
    return train, load_split(cfg, cfg.eval.test_split, stream)


def pixels(ds):
    """What feature extraction reads: the uint8 image tensor of an in-memory set, or the file-backed set."""
    return getattr(ds, "images", ds)
