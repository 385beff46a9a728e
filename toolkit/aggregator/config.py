"""The aggregator's run configuration: a TOML file validated by pydantic.

    schema_version = 1
    name = "fashion"
    weights = "weights.bin"        # codec-encoded fp32 "weights" file, relative to this file
    # bundle = "bundle"            # ... or a bundle folder whose "weights" role is used
    mode = "fedavg"                # or "fedbuff"

    [fedavg]                       # synchronous rounds
    deadline_s = 120.0
    min_reports = 2
    over_selection = 1.3

    [fedbuff]                      # buffered asynchronous
    buffer_size = 10
    max_staleness = 4

    [[stages]]
    name = "head"
    rounds = 10
    lr = 0.01

    [splitfed]                     # SplitFed: the aggregator also serves the edge (toolkit.splitfed)
    workers = 2                    # needs mode = "fedavg" and ``model``; start from
    queue = 16                     # toolkit.splitfed.initial_weights (every block a copy trains)
    max_copies = 64

    [evaluation]                   # the aggregator evaluates every model version itself
    test_images = 10000            # on the first N Fashion-MNIST test images (0 or no section: off);
                                   # needs ``model``; toolkit.aggregator.evaluating
    exit_weights = [1, 1, 0.5]     # an exit model's λ per exit for the total loss (default 1 each),
                                   # or {7 = 0.5} (the others 1)

A bad file raises ConfigError naming the field (``stages.0.lr: ...``).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolkit.errors import ConfigError, InternalError, describe

T = TypeVar("T")

SCHEMA_VERSION: Final = 1  # Final: its type is Literal[1], as schema_version's
ENCODINGS = ("fp32", "fp16", "int8", "int4", "sign1", "topk")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(_Strict):
    """One stage of the schedule. It ends after ``rounds`` rounds, or earlier when validation
    accuracy has not improved by ``plateau_min_delta`` for ``plateau_patience`` rounds.

    The plan decides, the stage overrides only what it names: ``local_epochs``, ``batch_size``,
    ``encoding`` and ``trainable_blocks`` left out (None) mean each phone's own plan (its
    bundle's manifest); named, they apply to every phone of the stage. A named
    ``trainable_blocks`` makes each phone train the deepest of its bundles not deeper than it
    (its shallowest when none is that shallow); left out, the phone trains its planned depth."""

    name: str
    rounds: int = Field(ge=1)
    lr: float = Field(gt=0)
    local_epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    participation: float = Field(default=1.0, gt=0, le=1)  # fraction of the phones seen recently
    encoding: str | None = None
    trainable_blocks: int | None = Field(default=None, ge=1)  # trainable depth: last k blocks incl. classifier
    plateau_patience: int = Field(default=0, ge=0)  # 0: no plateau check
    plateau_min_delta: float = Field(default=0.001, ge=0)

    @model_validator(mode="after")
    def _known_encoding(self):
        if self.encoding is None:
            return self
        base, _, bits = self.encoding.partition(":")
        if base == "layered":
            try:
                ok = 1 <= float(bits) <= 32
            except ValueError:
                ok = False
        else:
            ok = base in ENCODINGS and not bits
        if not ok:
            raise ValueError(
                f"encoding {self.encoding!r} is unknown: use one of {', '.join(ENCODINGS)} or 'layered:<bits, 1-32>'"
            )
        return self


class FedAvgConfig(_Strict):
    deadline_s: float = Field(default=120.0, gt=0)  # seconds from a round's opening
    min_reports: int = Field(default=1, ge=1)
    over_selection: float = Field(default=1.3, ge=1)  # tasks handed out per report wanted


class FedBuffConfig(_Strict):
    buffer_size: int = Field(default=10, ge=1)  # K: accepted updates per new version
    max_staleness: int = Field(default=4, ge=0)  # in model versions; older pushes are stale
    staleness_weight: Literal["sqrt", "constant"] = "sqrt"  # 1/sqrt(1+s), or 1


class RobustConfig(_Strict):
    aggregator: Literal["mean", "trimmed_mean", "median"] = "mean"
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)  # cut at each end, per coordinate
    clip_norm: float | None = Field(default=None, gt=0)  # scale each update down to this L2 norm


class Limits(_Strict):
    max_update_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)  # larger bodies: 413
    max_update_norm: float = Field(default=1e4, gt=0)  # L2 norm of a whole update; larger: rejected
    requests_per_s: float = Field(default=20.0, gt=0)  # per device, token bucket
    burst: int = Field(default=40, ge=1)
    seen_window_s: float = Field(default=300.0, gt=0)  # "available" = seen within this window
    # a validation probe's ONNX model (toolkit.aggregator.probes); larger: 413. MobileNetV2 is 9 MB
    max_probe_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)


class EdgeConfig(_Strict):
    """The ``[splitfed]`` section: the SplitFed edge's capacity (toolkit.splitfed.edge)."""

    workers: int = Field(default=2, ge=1)  # threads training phones' batches
    queue: int = Field(default=16, ge=0)  # batches waiting for a worker; beyond it: 503
    # phones with a model copy at once; beyond it: 503. A copy holds its part's weights, gradients
    # and momentum: 27 MB for MobileNetV2 cut after features.1, 20 MB after features.13
    max_copies: int = Field(default=64, ge=1)
    retry_after_s: int = Field(default=1, ge=1)  # what a 503 tells the phone to wait
    # Batches have their own token bucket per device, apart from ``limits``: a phone sends one
    # batch at a time, each waiting for its answer, so on a fast link a well-behaved phone sends
    # far more than 20 a second; the edge's bounded queue (503 + Retry-After) is what protects it.
    batches_per_s: float = Field(default=1000.0, gt=0)
    batch_burst: int = Field(default=1000, ge=1)


class EvaluationConfig(_Strict):
    """The ``[evaluation]`` section: the validation set the aggregator holds and evaluates every
    model version on (``toolkit.aggregator.evaluating``), as an external evaluator would post it."""

    test_images: int = Field(default=0, ge=0, le=10000)  # the first N of Fashion-MNIST's 10,000; 0: off
    # an exit model's λ for the total loss: one per exit in position order, or position → weight
    # (the others 1); checked against the model's exits (and for a sum above 0) when the
    # evaluator starts
    exit_weights: dict[int, float] | tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _weights_are_weights(self):
        if self.exit_weights is None:
            return self
        weights = list(self.exit_weights.values() if isinstance(self.exit_weights, dict) else self.exit_weights)
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(
                f"exit_weights {weights}: give finite weights of 0 or more (leave exit_weights out for 1 each)"
            )
        return self

    @property
    def on(self) -> bool:
        return self.test_images > 0


class RunConfig(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    weights: Path | None = None
    bundle: Path | None = None
    model: str | None = None  # model zoo name, for exporting the global model to PyTorch
    run_dir: Path | None = None  # default: runs/<name> beside the config file
    mode: Literal["fedavg", "fedbuff"] = "fedavg"
    seed: int = 0
    fedavg: FedAvgConfig = FedAvgConfig()
    fedbuff: FedBuffConfig = FedBuffConfig()
    robust: RobustConfig = RobustConfig()
    limits: Limits = Limits()
    stages: list[Stage] = Field(min_length=1)
    splitfed: EdgeConfig | None = None  # present: a SplitFed run, the edge served beside the aggregator
    evaluation: EvaluationConfig = EvaluationConfig()  # off unless test_images > 0

    @model_validator(mode="after")
    def _splitfed_needs(self):
        if self.splitfed is not None and self.mode != "fedavg":
            raise ValueError(
                f'SplitFed needs synchronous rounds, the run\'s mode is {self.mode!r}: set mode = "fedavg"'
            )
        if self.splitfed is not None and self.model is None:
            raise ValueError(
                "SplitFed trains the blocks past each phone's cut on the edge: "
                "name the run's 'model' (e.g. \"mobilenet_v2\")"
            )
        return self

    @model_validator(mode="after")
    def _evaluation_needs_the_model(self):
        if self.evaluation.on and self.model is None:
            raise ValueError(
                "the aggregator evaluates the run's model on the test images: name the run's 'model' "
                '(e.g. "mobilenet_v2"), or set evaluation.test_images = 0'
            )
        return self

    @model_validator(mode="after")
    def _one_weights_source(self):
        if (self.weights is None) == (self.bundle is None):
            raise ValueError(
                "give exactly one of 'weights' (a codec-encoded weights file) or 'bundle' (a bundle folder)"
            )
        return self

    def weights_path(self) -> Path:
        """The codec-encoded initial weights: ``weights``, or the bundle's "weights" role."""
        if self.weights is not None:
            return self.weights
        if self.bundle is None:  # _one_weights_source requires one of the two
            raise InternalError("a run config with neither weights nor bundle")
        from device_runtime.bundle import Bundle

        return Bundle.load(self.bundle).path("weights")

    def default_db(self) -> Path:
        return (self.run_dir or Path("runs") / self.name) / "aggregator.sqlite"


def parse_config(data: dict, base_dir: Path | None = None) -> RunConfig:
    """Validates a config mapping; relative paths are taken from ``base_dir``."""
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{describe(exc)} (fix these fields in the run config)") from exc
    if base_dir is None:
        return config
    fixes = {
        key: base_dir / value
        for key in ("weights", "bundle", "run_dir")
        if (value := getattr(config, key)) is not None and not value.is_absolute()
    }
    if config.run_dir is None:
        fixes["run_dir"] = base_dir / "runs" / config.name
    return config.model_copy(update=fixes)


def load_toml(path: str | Path, what: str, parse: Callable[[dict, Path], T]) -> T:
    """Reads the TOML file ``path`` and validates it with ``parse`` (given the file's folder, to
    resolve relative paths); every error names the file and says ``what`` it was meant to be."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist; pass --config with a TOML file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid TOML ({exc}); fix the line named") from exc
    try:
        return parse(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from exc


def load_config(path: str | Path) -> RunConfig:
    return load_toml(path, "run config", parse_config)


def config_json(config: RunConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)
