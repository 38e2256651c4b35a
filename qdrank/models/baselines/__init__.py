"""Baselines a search team already runs, on the :class:`~qdrank.models.base.RankModel` interface.

Each is fitted on the training split by ``fit_data`` (no gradient steps), keeps all its state in
registered buffers (saved as safetensors like any model) and scores from :class:`Batch` tensors, so
evaluation and a live request through ``Ranker`` take the same score path.
"""
