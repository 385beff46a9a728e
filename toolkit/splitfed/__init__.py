"""SplitFed on the edge: per-phone copies of the blocks past each phone's cut, trained on the
phones' activations (edge.py), and their HTTP routes (routes.py)."""

from toolkit.splitfed.edge import EdgeConfig, EdgeStatus, SplitFedEdge, edge_step, initial_weights

__all__ = ["EdgeConfig", "EdgeStatus", "SplitFedEdge", "edge_step", "initial_weights"]
