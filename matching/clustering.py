"""Clusters from matched edges: connected components with scipy's sparse graph code."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def connected_clusters(n_records: int, edges: pd.DataFrame) -> np.ndarray:
    """A cluster number per record; singletons get their own cluster.

    Numbers are canonical (cluster of the smallest record id first), so the
    same input always gives the same labels.
    """
    if n_records == 0:
        return np.array([], dtype=np.int64)
    left = edges["left"].to_numpy(dtype=np.int64)
    right = edges["right"].to_numpy(dtype=np.int64)
    graph = coo_matrix(
        (np.ones(len(left), dtype=np.int8), (left, right)), shape=(n_records, n_records)
    )
    _, labels = connected_components(graph, directed=False)
    # Renumber by first appearance so labels do not depend on scipy's internals.
    _, first_seen = np.unique(labels, return_index=True)
    rank = np.empty_like(first_seen)
    rank[np.argsort(first_seen)] = np.arange(len(first_seen))
    return rank[labels]
