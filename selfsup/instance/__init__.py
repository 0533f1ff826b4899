"""The instance classifier of PIC and the one-million-way classifier, in one place: the chunked
cosine softmax with its autograd (:mod:`.softmax`), the rows as a sharded module and the
recent-instance FIFO (:mod:`.rows`), and the row update the method runs (:mod:`.optim`)."""
from .optim import row_sgd_, sparse_sgd_
from .rows import InstanceClassifier, RecentInstances, gather_rows, shard_range
from .softmax import DEFAULT_CHUNK, Rows, Targets, cosine_softmax, topk_similar

__all__ = ["InstanceClassifier", "RecentInstances", "Rows", "Targets", "cosine_softmax", "topk_similar", "row_sgd_",
           "sparse_sgd_", "gather_rows", "shard_range", "DEFAULT_CHUNK"]
