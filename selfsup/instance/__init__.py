"""The instance classifier of PIC and the one-million-way classifier, in one place: the chunked
cosine softmax with its autograd (:mod:`.softmax`), the rows as a sharded module and the
recent-instance FIFO (:mod:`.rows`), the row update the method runs (:mod:`.optim`), and the fused step
that applies that update inside the backward's chunk loop (:mod:`.fused`)."""
from .fused import RowUpdate, fused_chunk_size
from .optim import row_sgd_, sparse_sgd_
from .rows import InstanceClassifier, RecentInstances, gather_rows, shard_range
from .softmax import DEFAULT_CHUNK, Rows, Targets, cosine_softmax, host_checks, no_host_checks, topk_similar

__all__ = ["InstanceClassifier", "RecentInstances", "Rows", "Targets", "cosine_softmax", "topk_similar", "row_sgd_",
           "sparse_sgd_", "gather_rows", "shard_range", "DEFAULT_CHUNK", "RowUpdate", "fused_chunk_size",
           "host_checks", "no_host_checks"]
