"""Runs the aggregator with uvicorn: ``fedkit serve`` or ``python -m toolkit.aggregator.server``.
One JSON line per event on stderr; TLS when given a certificate and key; with a ``[splitfed]``
section, the SplitFed edge and its routes too."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from toolkit.aggregator.app import create_app
from toolkit.aggregator.config import load_config
from toolkit.aggregator.coordinator import Coordinator, json_log_line
from toolkit.aggregator.store import Store
from toolkit.errors import ConfigError, FedkitError

if TYPE_CHECKING:
    from toolkit.splitfed.edge import SplitFedEdge


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "fields", None) is None:  # uvicorn's own messages
            record.fields = {"level": record.levelname.lower(), "logger": record.name}
            if record.exc_info:
                record.fields["exception"] = self.formatException(record.exc_info)
        return json_log_line(record)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("fedkit.aggregator", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def open_coordinator(config_path: str | Path, db: str | Path | None = None) -> Coordinator:
    """The started coordinator of a run: config loaded, database opened (default: under the
    run's directory), initial weights checked, a round open."""
    config = load_config(config_path)
    coordinator = Coordinator(config, Store(db or config.default_db()))
    coordinator.start()
    return coordinator


def open_edge(coordinator: Coordinator) -> "SplitFedEdge | None":
    """The run's SplitFed edge (its ``[splitfed]`` section), or None for a federated run."""
    config = coordinator.config
    if config.splitfed is None:
        return None
    from toolkit.models import load_model  # torch: only a SplitFed aggregator needs it
    from toolkit.splitfed.edge import SplitFedEdge

    return SplitFedEdge(coordinator, load_model(config.model), config.splitfed)


def serve(
    config_path: str | Path,
    db: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
) -> None:
    """Serves the run until interrupted."""
    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both --certfile and --keyfile")
    configure_logging()
    coordinator = open_coordinator(config_path, db)
    edge = open_edge(coordinator)
    logging.getLogger("fedkit.aggregator").info(
        "serve", extra={"fields": {"db": str(coordinator.store.path), "host": host, "port": port, "tls": certfile is not None,
                                   "splitfed": edge is not None}}
    )
    uvicorn.run(
        create_app(coordinator, edge=edge),
        host=host,
        port=port,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        log_config=None,
        access_log=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.aggregator.server", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args(argv)
    try:
        serve(args.config, args.db, args.host, args.port, args.certfile, args.keyfile)
    except FedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
