"""The search's configuration: a TOML file validated by pydantic (``toolkit/nas/nas.toml`` is the
default, sized for ~2–3 minutes on 2 cores).

    name = "fashion"               # the chosen network is saved as nas:NAME
    families = ["mobilenet_v2", "efficientnet_lite0"]   # or with "efficientnet_lite1"
    seed = 0
    strategy = "controller"        # or "random": the same loop, networks drawn uniformly
    reward_source = "server"       # or "federated": accuracy on phones' held-out slices ([fleet])

    [reward]
    beta = 7                       # R = Acc · (p / P)^(−β/100) (toolkit.nas.reward)

    [data]                         # disjoint slices of a seeded permutation of Fashion-MNIST's TRAIN split
    train_images = 8000            # the proxy training set the shared weights train on
    val_images = 1000              # the validation set: rewards, and the final top-k re-evaluation
    test_images = 2000             # held out: reported for the chosen network only
    adapter_images = 256           # the adapters' least squares, from the training slice

    [supernet]
    warmup_batches = 200           # uniformly random paths before the controller starts
    batch_size = 32
    lr = 0.0001                    # SGD, momentum 0.9, on the sampled path: its pretrained blocks
    new_lr = 0.001                 # ... its classifier and adapters
    batches_per_network = 3        # each sampled network trains its path this many batches
    eval_images = 250              # its reward: accuracy on the first N validation images

    [controller]
    steps = 20
    samples_per_step = 4
    lr = 0.01                      # Adam
    hidden = 64                    # LSTM width
    entropy_weight = 0.001
    baseline_decay = 0.9           # the rewards' moving average

    [final]
    top_k = 5                      # distinct networks re-evaluated on the whole validation slice

    [fleet]                        # reward_source = "federated" only: toolkit.nas.fleet.FleetConfig
    phones = 20                    # no url: an emulated fleet of 20 phones on B1's split

A bad file raises ConfigError naming the field (``controller.steps: ...``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolkit.aggregator.config import load_toml
from toolkit.errors import ConfigError, describe
from toolkit.nas.reward import DEFAULT_BETA
from toolkit.nas.space import FAMILIES

if TYPE_CHECKING:
    from toolkit.nas.fleet import FleetConfig

TRAIN_SPLIT = 60_000  # Fashion-MNIST's training images: every slice comes from them


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardConfig(_Strict):
    beta: int = Field(default=DEFAULT_BETA, ge=1, strict=True)  # a positive whole number


class DataConfig(_Strict):
    train_images: int = Field(default=8000, ge=16)
    val_images: int = Field(default=1000, ge=10)
    test_images: int = Field(default=2000, ge=10)
    adapter_images: int = Field(default=256, ge=4)  # taken from the training slice

    @model_validator(mode="after")
    def _fits(self):
        total = self.train_images + self.val_images + self.test_images
        if total > TRAIN_SPLIT:
            raise ValueError(
                f"train_images + val_images + test_images = {total}: the slices are disjoint parts of the "
                f"{TRAIN_SPLIT:,} training images; use fewer"
            )
        if self.adapter_images > self.train_images:
            raise ValueError(f"adapter_images {self.adapter_images} is more than train_images {self.train_images}")
        return self


class SupernetConfig(_Strict):
    warmup_batches: int = Field(default=200, ge=0)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.0001, gt=0)  # the pretrained blocks' (SGD, momentum 0.9)
    new_lr: float = Field(default=0.001, gt=0)  # the classifier's and the adapters' (fresh or least squares)
    batches_per_network: int = Field(default=3, ge=1)
    eval_images: int = Field(default=250, ge=1)


class ControllerConfig(_Strict):
    steps: int = Field(default=20, ge=1)
    samples_per_step: int = Field(default=4, ge=1)
    lr: float = Field(default=0.01, gt=0)
    hidden: int = Field(default=64, ge=1)
    entropy_weight: float = Field(default=1e-3, ge=0)
    baseline_decay: float = Field(default=0.9, ge=0, lt=1)


class FinalConfig(_Strict):
    top_k: int = Field(default=5, ge=1)


class NASConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # saved as nas:NAME
    families: tuple[str, ...] = ("mobilenet_v2", "efficientnet_lite0")
    seed: int = 0
    strategy: Literal["controller", "random"] = "controller"
    reward_source: Literal["server", "federated"] = "server"
    fleet: dict[str, Any] | None = None  # reward_source = "federated": toolkit.nas.fleet.FleetConfig's keys
    reward: RewardConfig = RewardConfig()
    data: DataConfig = DataConfig()
    supernet: SupernetConfig = SupernetConfig()
    controller: ControllerConfig = ControllerConfig()
    final: FinalConfig = FinalConfig()

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown {', '.join(map(repr, unknown))}: choose from {', '.join(FAMILIES)}")
        if len(families) < 2 or len(set(families)) != len(families):
            raise ValueError(f"give two or more distinct families of {', '.join(FAMILIES)}")
        return families

    @model_validator(mode="after")
    def _consistent(self):
        if self.supernet.eval_images > self.data.val_images:
            raise ValueError(
                f"supernet.eval_images {self.supernet.eval_images} is more than data.val_images {self.data.val_images}"
            )
        if self.supernet.batch_size > self.data.train_images:
            raise ValueError(
                f"supernet.batch_size {self.supernet.batch_size} is more than data.train_images "
                f"{self.data.train_images}"
            )
        if self.reward_source == "federated" and self.fleet is None:
            raise ValueError(
                'reward_source = "federated" needs a [fleet] section (an empty one: an emulated fleet on this host)'
            )
        if self.reward_source == "server" and self.fleet is not None:
            raise ValueError('a [fleet] section is for reward_source = "federated": set it, or drop the section')
        if self.fleet is not None:
            self.fleet_config()  # its errors at parse time
        return self

    def fleet_config(self) -> FleetConfig:
        """The ``[fleet]`` section as ``toolkit.nas.fleet.FleetConfig`` (which defines its keys)."""
        from toolkit.nas.fleet import FleetConfig  # the aggregator's client: only for a federated reward

        try:
            return FleetConfig.model_validate(self.fleet or {})
        except ValidationError as exc:
            raise ValueError("; ".join(f"fleet.{part}" for part in describe(exc).split("; "))) from exc

    @property
    def sampled_networks(self) -> int:
        return self.controller.steps * self.controller.samples_per_step

    def fingerprint(self) -> str:
        """The config as canonical JSON: a search folder continues only under the same one."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def parse_nas(data: dict, base_dir: Path | None = None) -> NASConfig:
    try:
        return NASConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{describe(exc)} (fix these fields in the search config)") from exc


def load_nas(path: str | Path) -> NASConfig:
    return load_toml(path, "search config", parse_nas)


def default_config_path() -> Path:
    return Path(__file__).parent / "nas.toml"


def default_config() -> NASConfig:
    return parse_nas(tomllib.loads(default_config_path().read_text()))
