"""Runs the aggregator with uvicorn: ``fedkit serve`` or ``python -m toolkit.aggregator.server``.
One JSON line per event on stderr; TLS when given a certificate and key; with a ``[splitfed]``
section, the SplitFed edge and its routes too."""

from __future__ import annotations

import argparse
import logging
import ssl
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
    run's directory), initial weights checked, a round open. A new database that cannot be
    started (e.g. the initial weights are missing) is removed again, with the folders made for it."""
    config = load_config(config_path)
    path = Path(db or config.default_db())
    created = [p for p in (path, *path.parents) if not p.exists()]  # the file first, then its new folders
    store = Store(path)
    try:
        coordinator = Coordinator(config, store)
        coordinator.start()
    except BaseException:
        store.close()
        for made in created:
            if made == path:
                for suffix in ("", "-wal", "-shm"):
                    path.with_name(path.name + suffix).unlink(missing_ok=True)
            elif made.is_dir() and not any(made.iterdir()):
                made.rmdir()
        raise
    return coordinator


def open_edge(coordinator: Coordinator) -> "SplitFedEdge | None":
    """The run's SplitFed edge (its ``[splitfed]`` section), or None for a federated run."""
    config = coordinator.config
    if config.splitfed is None:
        return None
    from toolkit.models import load_model  # torch: only a SplitFed aggregator needs it
    from toolkit.splitfed.edge import SplitFedEdge

    return SplitFedEdge(coordinator, load_model(config.model), config.splitfed)


def check_tls(certfile: str | Path, keyfile: str | Path) -> None:
    """Loads the certificate and key as uvicorn will: a missing, unreadable or mismatched file
    is a ConfigError now rather than a traceback at startup."""
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} does not exist: give the PEM file (e.g. from openssl req -x509 ...)")
    try:
        # an empty password: an encrypted key is refused here instead of prompting on the terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(certfile), str(keyfile), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--certfile {certfile} and --keyfile {keyfile} are not a PEM certificate and its private key ({exc}): "
            "give the matching pair (an encrypted key is not supported)"
        ) from exc


def serve(
    config_path: str | Path,
    db: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
) -> None:
    """Serves the run until interrupted. The port and the TLS files are checked before the run's
    database is opened."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is not a TCP port: give --port between 1 and 65535 (default 8080)")
    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both --certfile and --keyfile")
    if certfile is not None:
        check_tls(certfile, keyfile)
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
