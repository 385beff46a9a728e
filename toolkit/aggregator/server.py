"""Runs the aggregator with uvicorn: ``fedkit serve`` or ``python -m toolkit.aggregator.server``.
One JSON line per event on stderr; TLS when given a certificate and key; with a ``[splitfed]``
section, the SplitFed edge and its routes too; with an ``[evaluation]`` section, the run's own
evaluator (``toolkit.aggregator.evaluating``)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from toolkit.aggregator.app import create_app
from toolkit.aggregator.config import load_config
from toolkit.aggregator.coordinator import Coordinator, json_log_line
from toolkit.aggregator.evaluating import open_evaluator
from toolkit.aggregator.store import Store
from toolkit.errors import ConfigError, FedkitError, InternalError

if TYPE_CHECKING:
    from toolkit.splitfed.edge import SplitFedEdge


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "fields", None) is None:  # uvicorn's own messages
            fields = {"level": record.levelname.lower(), "logger": record.name}
            if record.exc_info:
                fields["exception"] = self.formatException(record.exc_info)
            record.__dict__["fields"] = fields  # where logging's extra= puts them
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


def open_edge(coordinator: Coordinator) -> SplitFedEdge | None:
    """The run's SplitFed edge (its ``[splitfed]`` section), or None for a federated run."""
    config = coordinator.config
    if config.splitfed is None:
        return None
    from toolkit.models import load_model  # torch: only a SplitFed aggregator needs it
    from toolkit.splitfed.edge import SplitFedEdge

    if config.model is None:  # RunConfig requires a model for SplitFed
        raise InternalError("a SplitFed run config without a model")
    return SplitFedEdge(coordinator, load_model(config.model), config.splitfed)


def check_tls(certfile: str | Path, keyfile: str | Path) -> None:
    """Loads the certificate and key as uvicorn will: a missing, unreadable or mismatched file
    is a ConfigError now rather than a traceback at startup."""
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} does not exist: give the PEM file (e.g. from openssl req -x509 ...)")
    try:
        # an empty password: an encrypted key is refused here instead of prompting on the terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(certfile), str(keyfile), password=lambda: b""
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--certfile {certfile} and --keyfile {keyfile} are not a PEM certificate and its private key ({exc}): "
            "give the matching pair (an encrypted key is not supported)"
        ) from exc


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port the kernel picks), not yet
    listening: uvicorn listens on it once the app has started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart after a crash binds at once
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another server on that port?"
        ) from exc
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, which writes its port to ``port_file`` once it accepts connections:
    whoever waits for it knows the server is up, and on which port."""

    def __init__(self, config: uvicorn.Config, port_file: str | Path | None):
        super().__init__(config)
        self.port_file = port_file

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.port_file is not None:  # whole or absent: never half a number
            staging = Path(f"{self.port_file}.tmp")
            staging.write_text(f"{self.config.port}\n")
            os.replace(staging, self.port_file)


def serve(
    config_path: str | Path,
    db: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    port_file: str | Path | None = None,
) -> None:
    """Serves the run until interrupted. The port and the TLS files are checked before the run's
    database is opened. Port 0 takes a free port: the port bound is in the ``serve`` log line
    and, with ``port_file``, written there once the server accepts connections."""
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"port {port} is not a TCP port: give --port between 1 and 65535 (default 8080), or 0 for a free one"
        )
    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both --certfile and --keyfile")
    if certfile is not None and keyfile is not None:  # both or neither, checked above
        check_tls(certfile, keyfile)
    configure_logging()
    sock = bind(host, port)
    port = sock.getsockname()[1]
    coordinator = open_coordinator(config_path, db)
    edge = open_edge(coordinator)
    evaluator = open_evaluator(coordinator)
    logging.getLogger("fedkit.aggregator").info(
        "serve",
        extra={
            "fields": {
                "db": str(coordinator.store.path),
                "host": host,
                "port": port,
                "tls": certfile is not None,
                "splitfed": edge is not None,
                "evaluation": coordinator.config.evaluation.test_images,
            }
        },
    )
    config = uvicorn.Config(
        create_app(coordinator, edge=edge, evaluator=evaluator),
        host=host,
        port=port,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        log_config=None,
        access_log=False,
    )
    _Server(config, port_file).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.aggregator.server", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0: a free port, reported in the serve log line")
    parser.add_argument("--port-file", help="write the port here (a file) once the server accepts connections")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args(argv)
    try:
        serve(args.config, args.db, args.host, args.port, args.certfile, args.keyfile, args.port_file)
    except FedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
