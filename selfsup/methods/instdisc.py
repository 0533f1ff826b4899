"""InstDisc (Wu et al. 2018): non-parametric instance discrimination with a memory bank.

One view per image, f = normalize(g(f(x))) (``model.head_layers=1``: the paper's linear 128-d
head). Settings in ``cfg.instdisc`` (see ``InstDiscConfig``).

State (all in ``state_dict``): ``bank`` (N, D) unit-norm rows, initialised uniform in
[-1, 1) then normalised (global torch RNG) in :meth:`setup`, or (``bank_init=features``) from the
untrained network's features in :meth:`init_from_data`; ``Z`` the NCE normaliser
(0 = not yet estimated).

* ``loss=softmax``: full softmax over the bank, ``cross_entropy(f V^T / t, index)``.
* ``loss=nce``: NCE with ``nce_k`` noise rows drawn uniformly from the N rows (global torch RNG,
  which the trainer checkpoints). One noise set is shared by the whole local batch (B x K x D
  memory avoided). The positive is the bank row of the sample's own instance. ``Z`` is
  estimated on the first batch as ``N * mean(exp(v.f/t))`` over its positive and noise rows
  (averaged over ranks), then kept fixed.
* After each step every rank applies ``v_i <- normalize(m v_i + (1 - m) f_i)`` (``m =
  bank_momentum``) for the features and indices of ALL ranks (all-gathered), so the bank stays
  identical on every rank.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import instance_softmax, nce_loss, nce_normalizer
from ..parallel import distributed as D
from .base import Encode, Method


class InstDisc(Method):
    """InstDisc. forward(views=[x], index) -> {"loss"}; after_step: memory-bank update."""

    n_views = 1

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        c = cfg.instdisc
        self.loss_kind, self.nce_k, self.temperature = c.loss, c.nce_k, c.temperature
        self.bank_momentum, self.bank_init = c.bank_momentum, c.bank_init
        self.register_buffer("bank", torch.empty(0, cfg.model.proj_dim))   # sized in setup()
        self.register_buffer("Z", torch.zeros(()))
        self._pending: list[tuple[Tensor, Tensor]] = []   # (features, indices) of this step's parts
        self._z_known = False   # host-side cache of "Z > 0": no device sync per step once set

    def setup(self, num_samples: int) -> None:
        """Allocate the (N, D) memory bank: rows uniform in [-1, 1), L2-normalised."""
        d = self.bank.shape[1]
        bank = torch.rand(num_samples, d, device=self.bank.device) * 2 - 1
        self.bank = F.normalize(bank, dim=1)

    @torch.no_grad()
    def init_from_data(self, encode: Encode) -> None:
        """``instdisc.bank_init=features``: the bank starts as the unit-norm head features of the
        untrained network (clean images, BN on batch statistics, run on a copy so no state
        changes) instead of random rows, so the first epoch's positives are not random vectors."""
        if self.bank_init != "features":
            return
        net = copy.deepcopy(nn.Sequential(self.backbone, self.head))
        self.bank.copy_(encode(net, train_bn=True).to(self.bank.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model built without setup() (e.g. to read a checkpoint's encoder) takes the bank's size
        # from the checkpoint; a bank already sized by setup() must match it
        key = prefix + "bank"
        self._z_known = False
        if key in state_dict and self.bank.shape[0] == 0:
            self.bank = torch.empty_like(state_dict[key], device=self.bank.device, dtype=self.bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def per_sample_loss(self) -> bool:
        """Per-sample terms given the noise rows and Z; Z is estimated from the whole first batch."""
        return self.loss_kind == "softmax" or self._z_known

    def prepare(self, views, index, chunk=None):
        """The step's NCE noise rows (one set shared by the batch), drawn once."""
        n = self.bank.shape[0]
        if n == 0:
            raise RuntimeError("InstDisc memory bank is empty: call setup(num_samples) before training")
        self._pending = []
        if self.loss_kind == "softmax":
            return None
        return self.bank[torch.randint(n, (self.nce_k,), device=self.bank.device)]   # (K, D)

    def encode(self, views):
        return [self.head(self.backbone(views[0]))]                     # (B, D)

    def loss(self, reps, noise, index, part=slice(None)):
        f, index, n, t = reps[0], index[part], self.bank.shape[0], self.temperature
        if self.loss_kind == "softmax":
            loss = instance_softmax(f, self.bank, index, t)
        else:
            pos = self.bank[index]                                       # (B, D)
            if not self._z_known:
                if float(self.Z) == 0.0:   # first batch: estimate Z once (same value on every rank)
                    self.Z.fill_(D.all_reduce_mean(nce_normalizer(f, pos, noise, t, n)).item())
                self._z_known = True
            loss = nce_loss(f, pos, noise, self.Z, t, n)
        self._pending.append((F.normalize(f.detach().to(self.bank.dtype), dim=1), index))
        return {"loss": loss}

    @torch.no_grad()
    def update_bank(self, f: Tensor, index: Tensor) -> None:
        """v_i <- normalize(m v_i + (1 - m) f_i) for the rows ``index`` (n,), f (n, D) unit norm."""
        m = self.bank_momentum
        self.bank[index] = F.normalize(self.bank[index] * m + f * (1.0 - m), dim=1)

    def discard_step(self) -> None:
        self._pending = []

    def rank_identical_buffers(self) -> list[str]:
        return ["bank", "Z"]   # updated from all ranks' features; Z averaged over ranks

    def monitor_bank(self) -> Tensor:
        return self.bank

    def after_step(self) -> None:
        """Update the bank with this step's features and indices from all ranks."""
        if self._pending:
            f, index = (torch.cat(x) for x in zip(*self._pending))
            self.update_bank(D.all_gather_no_grad(f), D.all_gather_no_grad(index))
            self._pending = []
