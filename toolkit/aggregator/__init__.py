"""The edge aggregator: run config, SQLite store, aggregation, schedule, HTTP API and server.

``fedkit serve`` runs it; ``global_state_dict`` turns a run's global model back into a
PyTorch state dict."""

from toolkit.aggregator.admin import global_state_dict, issue_tokens
from toolkit.aggregator.config import RunConfig, Stage, load_config, parse_config

__all__ = ["RunConfig", "Stage", "global_state_dict", "issue_tokens", "load_config", "parse_config"]
