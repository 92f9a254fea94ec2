"""Clusters from matched pairs: connected components, then guards against chaining.

Connected components over auto-matches alone chain: A~B and B~C put A and C
together whatever A and C say of each other, and at a million records one
namesake link can join two families. So after the components:

1. a weak link (probability below `strong_link`) that alone holds two groups
   of two or more records together (a bridge) is cut;
2. a cluster larger than `max_cluster_size`, or one holding a cannot-link
   pair (a steward said "different"), is rebuilt strongest link first,
   refusing any union that would exceed the size or join a cannot-link pair
   (size-constrained single linkage), so it splits on its weakest links;
3. must-link pairs (a steward said "same") are always joined.

Only the few suspect clusters reach the per-edge Python of steps 1 and 2;
everything else is scipy's connected components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mdm_pipeline.config.schema import distinct
from mdm_pipeline.config.settings import ClusteringSettings


@dataclass
class ClusterReport:
    """What the guards did."""

    clusters: int = 0
    largest: int = 0
    bridges_cut: int = 0
    split_oversize: int = 0
    split_cannot_link: int = 0
    split_clusters: list[int] = field(default_factory=list)  # sizes before splitting


def components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected-component label per record (scipy's numbering) for links left-right."""
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber by first appearance so labels never depend on scipy's internals."""
    _, first_seen = np.unique(labels, return_index=True)  # noqa: TID251 (return_index: it sorts)
    rank = np.empty_like(first_seen)
    rank[np.argsort(first_seen)] = np.arange(len(first_seen))
    return rank[labels]


def connected_clusters(n_records: int, edges: pd.DataFrame) -> np.ndarray:
    """A cluster number per record from edges (left, right); singletons get their own."""
    if n_records == 0:
        return np.array([], dtype=np.int64)
    left = edges["left"].to_numpy(dtype=np.int64)
    right = edges["right"].to_numpy(dtype=np.int64)
    return _canonical(components(n_records, left, right))


class _UnionFind:
    def __init__(self, nodes: np.ndarray) -> None:
        self.parent = {int(v): int(v) for v in nodes}
        self.size = dict.fromkeys(self.parent, 1)
        self.members = {v: {v} for v in self.parent}

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]
        self.members[a] |= self.members.pop(b)


def _constrained_rebuild(
    nodes: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    weight: np.ndarray,
    must: np.ndarray,
    max_size: int,
    cannot: dict[int, set[int]],
) -> list[tuple[int, int]]:
    """Edges kept when a cluster is rebuilt strongest first under size and cannot-link limits."""
    uf = _UnionFind(nodes)
    kept = []
    order = np.lexsort((-weight, ~must))  # must-links first, then by decreasing weight
    for e in order:
        a, b = uf.find(int(left[e])), uf.find(int(right[e]))
        if a == b:
            kept.append((int(left[e]), int(right[e])))
            continue
        ma, mb = uf.members[a], uf.members[b]
        forbidden = any(cannot.get(v, set()) & mb for v in ma)
        if not must[e] and (uf.size[a] + uf.size[b] > max_size or forbidden):
            continue
        uf.union(a, b)
        kept.append((int(left[e]), int(right[e])))
    return kept


def _cut_weak_bridges(
    n: int, labels: np.ndarray, left: np.ndarray, right: np.ndarray, weak: np.ndarray
) -> np.ndarray:
    """Mask of edges to drop: weak bridges between two groups of two or more records.

    An edge in a triangle is never a bridge, and an edge with an end of degree one
    holds a single record; both are ruled out at once with sparse matrix products,
    so the exact check (remove the edge, recount components) runs only on the rest.
    """
    drop = np.zeros(len(left), dtype=bool)
    if not weak.any():
        return drop
    adj = coo_matrix((np.ones(len(left)), (left, right)), shape=(n, n)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.float64)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    cand = weak & (degree[left] >= 2) & (degree[right] >= 2)
    if cand.any():
        idx = np.flatnonzero(cand)
        common = np.asarray(adj[left[idx]].multiply(adj[right[idx]]).sum(axis=1)).ravel()
        cand[idx[common > 0]] = False
    edge_cluster = labels[left]
    for c in distinct(edge_cluster[cand]):
        in_c = np.flatnonzero(edge_cluster == c)
        nodes, local = np.unique(  # noqa: TID251 (return_inverse: it sorts)
            np.concatenate([left[in_c], right[in_c]]), return_inverse=True
        )
        li, ri = local[: len(in_c)], local[len(in_c) :]
        alive = np.ones(len(in_c), dtype=bool)
        for k in np.flatnonzero(cand[in_c]):
            alive[k] = False
            lab = components(len(nodes), li[alive], ri[alive])
            part = np.bincount(lab)
            if len(part) > 1 and part[lab[li[k]]] >= 2 and part[lab[ri[k]]] >= 2:
                drop[in_c[k]] = True
            else:
                alive[k] = True
    return drop


def guarded_clusters(
    n_records: int,
    edges: pd.DataFrame,
    settings: ClusteringSettings,
    must_link: pd.DataFrame | None = None,
    cannot_link: pd.DataFrame | None = None,
) -> tuple[np.ndarray, ClusterReport]:
    """Cluster labels per record from auto-match edges (left, right, probability, weight)."""
    report = ClusterReport()
    if n_records == 0:
        return np.array([], dtype=np.int64), report
    left = edges["left"].to_numpy(dtype=np.int64)
    right = edges["right"].to_numpy(dtype=np.int64)
    weight = edges["weight"].to_numpy(dtype=np.float64)
    prob = edges["probability"].to_numpy(dtype=np.float64)
    must = np.zeros(len(left), dtype=bool)
    if must_link is not None and len(must_link):
        left = np.r_[left, must_link["left"].to_numpy(dtype=np.int64)]
        right = np.r_[right, must_link["right"].to_numpy(dtype=np.int64)]
        weight = np.r_[weight, np.full(len(must_link), np.inf)]
        prob = np.r_[prob, np.ones(len(must_link))]
        must = np.r_[must, np.ones(len(must_link), dtype=bool)]

    labels = components(n_records, left, right)
    drop = _cut_weak_bridges(n_records, labels, left, right, (prob < settings.strong_link) & ~must)
    report.bridges_cut = int(drop.sum())
    left, right, weight, must = left[~drop], right[~drop], weight[~drop], must[~drop]
    labels = components(n_records, left, right)

    cannot: dict[int, set[int]] = {}
    cannot_clusters: set[int] = set()
    if cannot_link is not None and len(cannot_link):
        cl = cannot_link["left"].to_numpy(dtype=np.int64)
        cr = cannot_link["right"].to_numpy(dtype=np.int64)
        for a, b in zip(cl.tolist(), cr.tolist(), strict=True):
            cannot.setdefault(a, set()).add(b)
            cannot.setdefault(b, set()).add(a)
        cannot_clusters = set(labels[cl][labels[cl] == labels[cr]].tolist())
    sizes = np.bincount(labels)
    oversize = set(np.flatnonzero(sizes > settings.max_cluster_size).tolist())
    redo = sorted(oversize | cannot_clusters)
    if redo:
        edge_cluster = labels[left]
        keep = ~np.isin(edge_cluster, redo)
        new_left, new_right = [left[keep]], [right[keep]]
        for c in redo:
            in_c = np.flatnonzero(edge_cluster == c)
            kept = _constrained_rebuild(
                np.flatnonzero(labels == c),
                left[in_c],
                right[in_c],
                weight[in_c],
                must[in_c],
                settings.max_cluster_size,
                cannot,
            )
            report.split_clusters.append(int(sizes[c]))
            if c in oversize:
                report.split_oversize += 1
            else:
                report.split_cannot_link += 1
            if kept:
                k = np.array(kept, dtype=np.int64)
                new_left.append(k[:, 0])
                new_right.append(k[:, 1])
        left, right = np.concatenate(new_left), np.concatenate(new_right)
        labels = components(n_records, left, right)
    labels = _canonical(labels)
    counts = np.bincount(labels)
    report.clusters = len(counts)
    report.largest = int(counts.max())
    return labels, report
