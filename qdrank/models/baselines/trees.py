"""A LightGBM tree ensemble evaluated with tensor ops, so ``gbdt`` is a torch graph like every model.

Why: scoring with ``lightgbm.Booster.predict`` happens outside torch, so the GBDT baseline could not
be exported to ONNX / TorchScript and served without LightGBM. :class:`TreeEnsemble` is built from
the booster's ``dump_model()`` (at fit time and whenever a checkpoint loads; the booster itself stays
stored as its model string, never pickled) and walks every tree at once: all nodes of all trees sit
in flat tables, each candidate holds one current node per tree, and a fixed number of steps (the
deepest tree's depth) replaces each node by its left or right child with gathers and ``where``.
Leaves point to themselves, so a candidate that reaches a leaf early stays there.

The decisions are LightGBM's own (``Tree::NumericalDecision`` / ``CategoricalDecision``):

* numerical (``decision_type`` ``<=``): NaN becomes 0 unless the node's ``missing_type`` is NaN; a
  missing value (``missing_type`` Zero: ``|x| <= 1e-35``; NaN: the value is NaN) goes to the
  ``default_left`` side; otherwise left iff ``x <= threshold``;
* categorical (``==``): NaN and negative values go right; otherwise ``int(x)`` (truncated toward
  zero) goes left iff it is in the node's category set (the ``a||b||c`` threshold).

Exactness: inputs are float32 and LightGBM compares them, widened to double, with a double
threshold. Each threshold ``t`` is stored as the largest float32 ``<= t``, for which ``x <= t`` and
``x <= float32(t)`` agree for every float32 ``x`` (infinities included), so the comparisons run in
float32 on any device. Leaf values are summed in float64 (LightGBM sums in double), then rounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

ZERO_THRESHOLD = 1e-35  # LightGBM's kZeroThreshold (a float literal): |x| <= this is zero
MISSING_TYPES = {"None": 0, "Zero": 1, "NaN": 2}


def round_down_float32(t: np.ndarray) -> np.ndarray:
    """The largest float32 ``<= t`` for each float64 ``t``: ``x <= t`` iff ``x <= result`` for float32 ``x``."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(over="ignore"):
        r = t.astype(np.float32)
    up = r.astype(np.float64) > t
    r[up] = np.nextafter(r[up], np.float32(-np.inf))
    return r


class _Flat:
    """Python lists of the flat node tables, filled tree by tree."""

    def __init__(self) -> None:
        self.feature: list[int] = []
        self.threshold: list[float] = []
        self.missing: list[int] = []
        self.default_left: list[bool] = []
        self.is_cat: list[bool] = []
        self.cat_row: list[int] = []
        self.children: list[tuple[int, int]] = []
        self.value: list[float] = []
        self.cat_sets: list[list[int]] = [[]]  # row 0: the empty set (numerical nodes point there)

    def add(self, node: dict[str, Any]) -> tuple[int, int]:
        """Append ``node`` and its subtree -> (its index, its subtree's depth)."""
        i = len(self.feature)
        self.feature.append(0)
        self.threshold.append(0.0)
        self.missing.append(0)
        self.default_left.append(False)
        self.is_cat.append(False)
        self.cat_row.append(0)
        self.children.append((i, i))  # a leaf points to itself
        self.value.append(0.0)
        if "leaf_value" in node or "split_feature" not in node:
            self.value[i] = float(node.get("leaf_value", 0.0))
            return i, 0
        self.feature[i] = int(node["split_feature"])
        self.missing[i] = MISSING_TYPES[str(node.get("missing_type", "None"))]
        self.default_left[i] = bool(node.get("default_left", False))
        kind = node.get("decision_type", "<=")
        if kind == "==":
            self.is_cat[i] = True
            self.cat_row[i] = len(self.cat_sets)
            self.cat_sets.append([int(c) for c in str(node["threshold"]).split("||") if c != ""])
        elif kind == "<=":
            self.threshold[i] = float(node["threshold"])
        else:
            raise ValueError(f"LightGBM tree: unknown decision_type {kind!r}")
        left, dl = self.add(node["left_child"])
        right, dr = self.add(node["right_child"])
        self.children[i] = (left, right)
        return i, 1 + max(dl, dr)


class TreeEnsemble(nn.Module):
    """``forward(x [N, F] float32) -> [N] float32``: the raw score (sum of leaf values) of every row.

    Built with :meth:`load` from ``booster.dump_model()``; the tables are non-persistent buffers (the
    booster's model string is what a checkpoint stores), moved with the module to any device. Nodes
    are ordered numerical splits, categorical splits, leaves: every split's decision is computed for
    every row at once with broadcast compares (no per-node gathers), then the walk only looks up
    decisions and children.
    """

    ROW_CHUNK = 2048  # rows per pass when eager (the [rows, splits] decision matrix stays small)

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.cat_width = 1
        self.n_trees = 0
        self.n_leaves = 0
        self.average = False
        for name, dtype in (("roots", torch.long), ("child", torch.long), ("value", torch.float64),
                            ("num_feature", torch.long), ("threshold", torch.float32), ("nan_left", torch.bool),
                            ("zero_missing", torch.bool), ("default_left", torch.bool),
                            ("cat_feature", torch.long), ("cat_base", torch.long), ("cat_table", torch.bool)):
            self.register_buffer(name, torch.zeros(0, dtype=dtype), persistent=False)

    @torch.no_grad()
    def load(self, dump: dict[str, Any]) -> TreeEnsemble:
        """Tables from a LightGBM ``dump_model()`` dict (one output per iteration: regression/ranking)."""
        if int(dump.get("num_tree_per_iteration", 1)) != 1:
            raise ValueError("TreeEnsemble evaluates single-output boosters only (num_tree_per_iteration = 1)")
        flat, roots, depth = _Flat(), [], 0
        for tree in dump.get("tree_info", []):
            root, d = flat.add(tree["tree_structure"])
            roots.append(root)
            depth = max(depth, d)
        n = len(flat.feature)
        leaf = np.array([flat.children[i] == (i, i) for i in range(n)], dtype=bool)
        cat = np.array(flat.is_cat, dtype=bool) & ~leaf
        num = ~leaf & ~cat
        order = np.concatenate([np.flatnonzero(num), np.flatnonzero(cat), np.flatnonzero(leaf)]).astype(np.int64)
        new_id = np.empty(n, dtype=np.int64)
        new_id[order] = np.arange(n)
        children = new_id[np.array(flat.children, dtype=np.int64).reshape(n, 2)][order] if n else np.zeros((0, 2))
        thr = np.array(flat.threshold, dtype=np.float64)[order[:num.sum()]]
        missing = np.array(flat.missing, dtype=np.int64)[order[:num.sum()]]
        dleft = np.array(flat.default_left, dtype=bool)
        # where a NaN goes: missing type NaN or Zero -> the default side; None -> compared as 0
        nan_left = np.where(missing == MISSING_TYPES["None"], 0.0 <= thr, dleft[order[:num.sum()]])
        cat_nodes = order[num.sum():num.sum() + cat.sum()]
        sets = [flat.cat_sets[flat.cat_row[i]] for i in cat_nodes]
        width = max([max(s, default=-1) + 1 for s in sets] + [0]) + 1  # last column: "in no set"
        table = np.zeros((len(sets), width), dtype=bool)
        for r, s in enumerate(sets):
            table[r, s] = True
        dev = self.roots.device
        tensors = {"roots": torch.from_numpy(new_id[np.array(roots, dtype=np.int64)]),
                   "child": torch.from_numpy(np.ascontiguousarray(children, dtype=np.int64).reshape(-1)),
                   "value": torch.tensor(flat.value, dtype=torch.float64)[torch.from_numpy(order)],
                   "num_feature": torch.tensor(flat.feature, dtype=torch.long)[torch.from_numpy(order[:num.sum()])],
                   "threshold": torch.from_numpy(round_down_float32(thr)),
                   "nan_left": torch.from_numpy(nan_left.astype(bool)),
                   "zero_missing": torch.from_numpy(missing == MISSING_TYPES["Zero"]),
                   "default_left": torch.from_numpy(dleft[order[:num.sum()]]),
                   "cat_feature": torch.tensor(flat.feature, dtype=torch.long)[torch.from_numpy(cat_nodes)],
                   "cat_base": torch.arange(len(sets), dtype=torch.long) * width,
                   "cat_table": torch.from_numpy(table).reshape(-1)}
        for name, t in tensors.items():
            setattr(self, name, t.to(dev))
        self.depth, self.cat_width, self.n_trees = depth, width, len(roots)
        self.n_leaves = int(leaf.sum())
        self.average = bool(dump.get("average_output", False))
        return self

    def decisions(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n_nodes] bool: does row n go left at node j (leaves: False, they point to themselves)."""
        v = x.index_select(1, self.num_feature)                                   # [N, numerical splits]
        nan = torch.isnan(v)
        zero = self.zero_missing & (v.abs() <= ZERO_THRESHOLD)                     # missing type Zero
        # boolean algebra, not where(): ONNX Runtime has no Where kernel for booleans
        go = (nan & self.nan_left) | (~nan & ((zero & self.default_left) | (~zero & (v <= self.threshold))))
        parts = [go]
        if self.cat_feature.shape[0]:
            c = x.index_select(1, self.cat_feature)                                # [N, categorical splits]
            c = torch.where(torch.isnan(c), torch.full_like(c, -1.0), c).clamp(-1.0, float(self.cat_width - 1))
            c = c.long()                                                           # truncates toward 0, as C++
            parts.append(self.cat_table[self.cat_base + c.clamp(min=0)] & (c >= 0))
        parts.append(torch.zeros(x.shape[0], self.n_leaves, dtype=torch.bool, device=x.device))
        return torch.cat(parts, 1)

    def _walk(self, x: torch.Tensor) -> torch.Tensor:
        go = self.decisions(x)
        node = self.roots.unsqueeze(0).expand(x.shape[0], self.n_trees)           # [N, T] current node per tree
        for _ in range(self.depth):
            node = self.child[node * 2 + (~go.gather(1, node)).long()]
        out = self.value[node].sum(-1)
        if self.average and self.n_trees:
            out = out / self.n_trees
        return out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or x.shape[0] <= self.ROW_CHUNK:
            return self._walk(x)
        return torch.cat([self._walk(c) for c in x.split(self.ROW_CHUNK)])
