"""The federated reward: a sampled network's accuracy on the phones' held-out slices, measured
through the aggregator's validation probes (``toolkit.aggregator.probes``); no image leaves a
phone.

``FleetValidator.accuracy(supernet, choice)`` builds the standalone network, exports its ONNX
inference model (images → logits, the exporter's ONNX), posts it as a probe, waits until
``min_answers`` phones have answered (or ``deadline_s`` has passed: then a FedkitError) and
returns correct / total over the answers, i.e. the sample-weighted accuracy over the phones'
held-out slices. The probe is closed after (its model bytes dropped on the aggregator).

Which phones answer first decides which slices count when more than ``min_answers`` phones
could answer: for a figure comparable between networks, ask for every phone of the fleet.

``emulated_fleet`` starts a fleet on this host when the ``[fleet]`` section names no url: the
aggregator (``fedkit serve``'s process) on a loopback port, and ``phones`` phone processes
(``python -m device_runtime.phone_loop --probes-only``) each holding its shard of B1's split
(Dirichlet 0.5 over the 60,000 Fashion-MNIST training images, seed 0). Its run trains nothing:
its phones answer probes only. By hand: ``python -m toolkit.nas.fleet MODEL`` (``--url`` and
``--admin-token-file`` for a real fleet) prints a model's accuracy measured so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_runtime.codec import UpdateHeader, encode
from device_runtime.phone_loop import CREDENTIAL, SHARD, Credential
from device_runtime.preprocess import InputSpec
from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.config import parse_config
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.store import Store
from toolkit.benchmarking import B1_DATA
from toolkit.child import ChildProcess
from toolkit.errors import ConfigError, FedkitError, describe

if TYPE_CHECKING:
    from toolkit.models import SplittableModel
    from toolkit.nas.space import Supernet

B1_PHONES = 20  # B1's fleet size


class FleetConfig(BaseModel):
    """The ``[fleet]`` section of a search with ``reward_source = "federated"``."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = None  # the aggregator; None: an emulated fleet on this host
    admin_token_file: Path | None = None  # a file holding an admin token (fedkit enrol-token --admin); with url
    phones: int = Field(default=B1_PHONES, ge=1, le=200)  # the emulated fleet's phones
    min_answers: int | None = Field(default=None, ge=1)  # default: every phone of the emulated fleet
    deadline_s: float = Field(default=300.0, gt=0)  # per sampled network
    poll_s: float = Field(default=0.5, gt=0)  # how often the host looks for answers (phones long-poll)

    @model_validator(mode="after")
    def _where(self) -> FleetConfig:
        if self.url is not None and (self.admin_token_file is None or self.min_answers is None):
            raise ValueError("with a fleet url, give admin_token_file and min_answers too")
        if self.url is None and self.admin_token_file is not None:
            raise ValueError("admin_token_file is for a fleet at a url: give the url, or drop admin_token_file")
        if self.url is None and self.min_answers is not None and self.min_answers > self.phones:
            raise ValueError(f"min_answers = {self.min_answers} is more than the emulated fleet's {self.phones} phones")
        return self

    def admin_token(self) -> str:
        if self.admin_token_file is None:
            raise ConfigError("the [fleet] section names no admin_token_file")
        try:
            return self.admin_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin token file {self.admin_token_file} ({exc})") from exc


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    answers: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def probe_model(model: SplittableModel) -> tuple[bytes, InputSpec]:
    """The ONNX inference model of ``model`` (the whole model, images → logits, as the exporter
    writes it) and its input spec (as a bundle's manifest has it)."""
    import torch

    from exporters.onnx import export_model

    whole = model.part(0, len(model.block_names))
    example = torch.zeros(1, *model.input_shape)
    spec = InputSpec(*model.input_shape[1:], channels=model.input_shape[0])
    return export_model(whole, example).SerializeToString(), spec


class FleetValidator:
    """Measures networks' accuracy on the fleet behind the aggregator at ``url`` (the search's
    ``Validator``)."""

    def __init__(
        self,
        url: str,
        admin_token: str,
        min_answers: int,
        deadline_s: float,
        *,
        poll_s: float = 0.5,
        verify: bool | str = True,
    ):
        if min_answers < 1 or deadline_s <= 0:
            raise ConfigError(f"min_answers={min_answers}, deadline_s={deadline_s}: give at least 1 and more than 0")
        self.min_answers, self.deadline_s, self.poll_s = min_answers, deadline_s, poll_s
        self._http = httpx.Client(
            base_url=url.rstrip("/") + "/v1",
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=120.0,
            verify=verify,
            transport=httpx.HTTPTransport(retries=3, verify=verify),  # connection errors only
        )

    def close(self) -> None:
        self._http.close()

    def accuracy(self, supernet: Supernet, choice: Sequence[int]) -> float:
        """The sampled network's accuracy on the phones' held-out slices."""
        return self.accuracy_of(supernet.network(choice))

    def accuracy_of(self, model: SplittableModel) -> float:
        return self.measure(model).accuracy

    def measure(self, model: SplittableModel) -> ProbeResult:
        blob, spec = probe_model(model)
        return self.measure_onnx(blob, spec)

    def measure_onnx(self, blob: bytes, spec: InputSpec) -> ProbeResult:
        """Posts the probe, waits for ``min_answers`` answers, closes it and returns the sums."""
        probe = self.post(blob, spec)
        deadline = time.monotonic() + self.deadline_s
        try:
            while True:
                found = self.result(probe)
                if found["answers"] >= self.min_answers:
                    break
                if time.monotonic() >= deadline:
                    raise FedkitError(
                        f"only {found['answers']} of the {self.min_answers} phones asked for answered probe "
                        f"{probe[:12]} within {self.deadline_s:g} s: check the phones are running, raise "
                        "deadline_s or lower min_answers"
                    )
                time.sleep(self.poll_s)
        finally:
            found = self._call("POST", f"/probes/{probe}/close")  # answers that came meanwhile count too
        return ProbeResult(probe, found["answers"], found["correct"], found["total"])

    def post(self, blob: bytes, spec: InputSpec) -> str:
        import json

        headers = {"Content-Type": "application/octet-stream", "X-Fedkit-Input": json.dumps(spec.to_dict())}
        return str(self._call("POST", "/probes", content=blob, headers=headers)["probe"])

    def result(self, probe: str) -> dict[str, Any]:
        return self._call("GET", f"/probes/{probe}")

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise FedkitError(
                f"{method} {path}: the aggregator at {self._http.base_url} did not answer ({exc})"
            ) from exc
        try:
            body = r.json()
        except ValueError:
            body = {"reason": r.text[:200]}
        if r.status_code != 200:
            reason = body.get("reason", body) if isinstance(body, dict) else body
            raise FedkitError(f"{method} {path}: the aggregator answered {r.status_code} ({reason})")
        return body


# -- an emulated fleet ------------------------------------------------------------------------
class ProbePhone(ChildProcess):
    """An emulated phone answering probes only: ``python -m device_runtime.phone_loop --probes-only``."""

    def __init__(self, phone_dir: Path, poll_s: float):
        self.phone_dir = phone_dir
        self.command = [
            *(sys.executable, "-m", "device_runtime.phone_loop", str(phone_dir)),
            *("--probes-only", "--json", "--max-wait", str(poll_s)),
        ]

    def start(self) -> None:
        # one thread each: many phones share the host's cores
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.phone_dir / "phone.log", "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, env=env, start_new_session=True)


@dataclass
class EmulatedFleet:
    url: str
    admin_token: str
    aggregator: AggregatorProcess
    phones: list[ProbePhone] = field(default_factory=list)

    def stop(self) -> None:
        for phone in self.phones:
            phone.kill()
        self.aggregator.stop()


def probes_only_run(folder: Path) -> Path:
    """A run config for an aggregator that serves probes only: one round no phone is given (its
    phones never pull tasks), placeholder weights. Returns the config's path."""
    from toolkit.runs import config_toml

    folder.mkdir(parents=True, exist_ok=True)
    header = UpdateHeader("probes", 0, 0, 1, kind="weights")
    (folder / "weights.bin").write_bytes(encode(header, {"unused": np.zeros(1, np.float32)}, "fp32"))
    config = parse_config(
        {
            "name": "probes",
            "weights": "weights.bin",
            "run_dir": ".",
            "stages": [{"name": "probes", "rounds": 1, "lr": 1}],
        }
    )
    (folder / "run.toml").write_text(config_toml(config))
    return folder / "run.toml"


def start_fleet(
    workdir: str | Path, phones: int = B1_PHONES, *, poll_s: float = 0.5, shards: dict[str, Any] = B1_DATA
) -> EmulatedFleet:
    """Starts an aggregator and ``phones`` probes-only phones holding their shards of
    ``shards``' split (default B1's) in ``workdir`` (must not exist, or be empty); ``stop()`` it."""
    from toolkit.data import write_shards

    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"fleet folder {workdir} is not empty: pass a new one")
    ids = [f"phone-{i:03d}" for i in range(phones)]
    write_shards(
        workdir / "shards",
        ids,
        shards["partition"],
        alpha=shards["alpha"],
        seed=shards["seed"],
        train_images=shards["train_images"],
    )
    run_toml = probes_only_run(workdir / "run")
    db = workdir / "aggregator.sqlite"
    store = Store(db)
    try:
        tokens = issue_tokens(store, phones, "enrol")
        admin_token = issue_tokens(store, 1, "admin")[0]
    finally:
        store.close()
    aggregator = AggregatorProcess(run_toml, db, workdir / "aggregator.log")
    aggregator.start()
    fleet = EmulatedFleet(aggregator.url, admin_token, aggregator)
    try:
        for device_id, token in zip(ids, tokens, strict=True):
            phone_dir = workdir / "phones" / device_id
            phone_dir.mkdir(parents=True)
            (workdir / "shards" / f"{device_id}.npz").rename(phone_dir / SHARD)
            Credential(aggregator.url, device_id, enrol_token=token).save(phone_dir / CREDENTIAL)
            phone = ProbePhone(phone_dir, poll_s)
            phone.start()
            fleet.phones.append(phone)
    except BaseException:
        fleet.stop()
        raise
    return fleet


@contextlib.contextmanager
def fleet_validator(
    config: FleetConfig, workdir: str | Path, *, shards: dict[str, Any] = B1_DATA
) -> Iterator[FleetValidator]:
    """The search's validator for its ``[fleet]`` section: on the aggregator at ``config.url``,
    or on an emulated fleet started in ``workdir`` (phones holding ``shards``' split) and
    stopped after the block."""
    fleet = None
    if config.url is None:
        fleet = start_fleet(workdir, config.phones, poll_s=config.poll_s, shards=shards)
        url, token, min_answers = fleet.url, fleet.admin_token, config.min_answers or config.phones
    else:
        url, token, min_answers = config.url, config.admin_token(), config.min_answers or 1
    validator = FleetValidator(url, token, min_answers, config.deadline_s, poll_s=config.poll_s)
    try:
        yield validator
    finally:
        validator.close()
        if fleet is not None:
            fleet.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m toolkit.nas.fleet MODEL``: a model's accuracy on the phones' held-out slices, by hand."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m toolkit.nas.fleet", description=main.__doc__)
    parser.add_argument("model", help="a model zoo name, e.g. mobilenet_v2 or nas:NAME (a saved searched network)")
    parser.add_argument("--url", help="the aggregator (default: an emulated fleet on this host)")
    parser.add_argument("--admin-token-file", type=Path, help="a file holding an admin token, with --url")
    parser.add_argument("--min-answers", type=int, help="phones that must answer (default: every emulated phone)")
    parser.add_argument("--phones", type=int, default=B1_PHONES, help="the emulated fleet's phones (B1's split)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds to wait for the answers")
    args = parser.parse_args(argv)
    from toolkit.models import load_model

    try:
        config = FleetConfig(
            url=args.url,
            admin_token_file=args.admin_token_file,
            phones=args.phones,
            min_answers=args.min_answers,
            deadline_s=args.deadline,
        )
        model = load_model(args.model)
        with tempfile.TemporaryDirectory() as workdir, fleet_validator(config, Path(workdir) / "fleet") as validator:
            t0 = time.perf_counter()
            result = validator.measure(model)
    except (FedkitError, ValidationError) as exc:  # ValidationError: a bad combination of options
        print(f"error: {describe(exc) if isinstance(exc, ValidationError) else exc}", file=sys.stderr)
        return 1
    print(
        f"{args.model}: {result.accuracy:.2%} on {result.total:,} held-out images of {result.answers} phones "
        f"({result.correct:,} right; probe {result.probe[:12]}, {time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
