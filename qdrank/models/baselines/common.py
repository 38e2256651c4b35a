"""What every baseline shares: no learned parts, item tables as buffers, buffers that may change
size when fitted, and batch iteration over a split for fitting."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
from qdrank.data.shards import ShardedDataset
from qdrank.models.base import RankModel, RequestState

FIT_BATCH = 8192  # impressions per batch while fitting


class FittedBuffers(nn.Module):
    """A module whose buffers take their size from the data at fit time.

    ``load_state_dict`` normally refuses a tensor whose shape differs from the freshly built
    module's; a fitted table's size is only known from the checkpoint, so it is resized first.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ItemTables(nn.Module):
    """Item side-feature ids/values by item row: the buffers of ``FeatureEmbedder`` without its
    embedding table, so ``model.emb.set_item_tables`` and ``model.emb.item_sparse`` work as for
    every other model."""

    def __init__(self, fmap: FeatureMap):
        super().__init__()
        n_items = len(fmap.item_vocab) + 2
        self.register_buffer("item_sparse", torch.zeros(n_items, fmap.n_slots("item"), dtype=torch.long))
        self.register_buffer("item_dense", torch.zeros(n_items, fmap.n_numeric("item")))

    def set_item_tables(self, sparse, dense) -> None:
        with torch.no_grad():
            self.item_sparse.copy_(torch.as_tensor(sparse))
            self.item_dense.copy_(torch.as_tensor(dense))


class Baseline(RankModel):
    """A zero-parameter ranker fitted from the training split (``gradient_trained = False``).

    It skips ``RankModel.__init__``'s learned parts (embedding table, position tower, head): the
    trainer calls :meth:`fit_data` once instead of running epochs. Subclasses implement
    :meth:`candidate_scores`; the CVR logit is a constant 0 (no baseline models conversion).
    :meth:`fit_data` also takes streamed shards (a ``ShardedDataset``), fitting from its training
    batches (:meth:`batches`).
    """

    gradient_trained = False
    config_class = ModelConfig

    def __init__(self, fmap: FeatureMap, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.fmap = fmap
        self.cfg = cfg
        self.emb = ItemTables(fmap)
        self.position = None

    def candidate_scores(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def encode_request(self, batch: Batch) -> RequestState:
        return {}

    def score(self, state: RequestState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.candidate_scores(batch).float()
        return s, torch.zeros_like(s)

    def n_parameters(self) -> int:
        return 0

    def summary(self) -> dict:
        """What was fitted, for result.json (a baseline has no parameters to count)."""
        return {}

    def batches(self, ds: SearchLogDataset | ShardedDataset, split: str, rows: np.ndarray | None = None,
                batch_size: int = FIT_BATCH) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """(batch on the model's device, impression indices of its candidates) over ``split``, or
        over the request ``rows`` when given. From shards: the streamed batches, with no impression
        indices (None) and no ``rows``."""
        if isinstance(ds, ShardedDataset):
            if rows is not None:
                raise ValueError(f"{type(self).__name__}: request rows need the dataset in memory, not shards")
            for b in ds.iter_batches(split, batch_size, extra_inputs=self.extra_inputs):
                yield b.to(self.device), None
            return
        groups = ds.batch_rows(split, batch_size) if rows is None else ds.pack(rows, batch_size)
        for g in groups:
            yield ds.make_batch(g, self.extra_inputs).to(self.device), torch.from_numpy(ds.candidate_index(g))


def sparse_features(fmap: FeatureMap, role: str, types: tuple[str, ...] = ("categorical", "list"),
                    exclude: tuple[str, ...] = ("item_id", "user_id")) -> list[tuple[str, int, int]]:
    """(name, first slot, width) of a role's sparse features of the given types."""
    return [(f.name, s, w) for f, s, w in fmap.slot_layout(role) if f.type in types and f.name not in exclude]


def group_sizes(group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups] number of elements per group id (``torch.bincount`` has no ONNX operator; a
    scatter-add does)."""
    return torch.zeros(n_groups, dtype=torch.long, device=group.device).scatter_add(0, group, torch.ones_like(group))


def sorted_lookup(keys: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element of ``x``, the index of its value in the sorted 1-d ``keys`` and whether it is there.

    A lower-bound binary search written as a fixed number of gather / compare / where steps
    (``len(keys).bit_length()``, known when the graph is built): ``torch.searchsorted`` has no ONNX
    operator, and a dense table indexed by key can be far too large (keys such as (query token,
    category) pairs). Same answer as ``torch.searchsorted(keys, x)`` (side left), clamped to a valid index.
    """
    k = int(keys.shape[0])  # a constant of the graph (a fitted buffer), also while tracing
    lo = torch.zeros_like(x)
    hi = torch.full_like(x, k)
    for _ in range(k.bit_length()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        less = keys[mid.clamp(max=k - 1)] < x
        active = lo < hi
        lo = torch.where(active & less, mid + 1, lo)
        hi = torch.where(active & ~less, mid, hi)
    at = lo.clamp(max=max(k - 1, 0))
    return at, keys[at] == x if k else torch.zeros_like(x, dtype=torch.bool)

