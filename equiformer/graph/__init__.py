"""Neighbour lists in plain torch: radius graphs for molecules and periodic systems.

``radius_graph(pos, cutoff, batch=None, max_num_neighbors=None) -> edge_index [2, E]``
``radius_graph_pbc(pos, cell, pbc, cutoff, batch=None) -> (edge_index [2, E], shift [E, 3] long)``
``build_edges(data, cutoff) -> (edge_index [2, E], edge_vec [E, 3])`` for PyG Data/Batch.

Convention: row 0 = neighbour j (source), row 1 = centre i (target);
``vec_ij = pos[j] + shift @ cell[batch[j]] - pos[i]``; pairs with distance < cutoff, both
directions, no self pair at zero shift; edges sorted by (i, j, shift).
"""

from .edges import build_edges, edge_vectors
from .radius import neighbor_search, radius_graph, radius_graph_pbc
from .reference import radius_graph_pbc_reference

__all__ = [
    "build_edges",
    "edge_vectors",
    "neighbor_search",
    "radius_graph",
    "radius_graph_pbc",
    "radius_graph_pbc_reference",
]
