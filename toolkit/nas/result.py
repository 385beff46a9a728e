"""What a search records and returns: every sampled network, every controller step, the finalists
and the chosen network, in ``OUT/search.json`` (``SearchResult``). The search (``search``) writes
it; the report (``report``) and benchmarks read it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

RESULT_FILE = "search.json"


class NetworkRecord(BaseModel):
    """One sampled network (or one re-evaluated in the final phase)."""

    model_config = ConfigDict(frozen=True)

    step: int  # controller step, from 1 (0: the final re-evaluation)
    sample: int  # its index within the step
    choice: tuple[int, ...]
    arch_id: str
    params: int
    flops: int
    accuracy: float  # validation accuracy (a fraction)
    reward: float
    train_loss: float  # mean cross-entropy of its training batches


class StepRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: int
    mean_reward: float
    max_reward: float
    baseline: float | None  # the controller's moving-average baseline after the step (random: None)
    entropy: float | None  # the policy's mean entropy over the step's samples, nats (random: None)
    loss: float | None


class Times(BaseModel):
    setup_s: float = 0.0  # data, supernet, adapters
    warmup_s: float = 0.0
    search_s: float = 0.0
    final_s: float = 0.0


class Finalist(BaseModel):
    model_config = ConfigDict(frozen=True)

    arch_id: str
    choice: tuple[int, ...]
    params: int
    mflops: float
    search_reward: float | None  # its best reward during the search (None: never sampled)
    accuracy: float  # on the whole validation slice, final shared weights
    reward: float


class ChosenNetwork(BaseModel):
    model_config = ConfigDict(frozen=True)

    arch_id: str
    choice: tuple[int, ...]
    description: list[str]  # the block list, one line per pool and adapter
    blocks: list[str]
    params: int
    mflops: float
    val_accuracy: float
    test_accuracy: float
    reward: float
    model_id: str  # nas:NAME
    saved_to: str  # the saved network's folder


class SearchResult(BaseModel):
    """``OUT/search.json``: what the search chose and how it got there."""

    schema_version: Literal[1] = 1
    name: str
    strategy: str
    reward_source: str
    families: tuple[str, ...]
    seed: int
    reward_formula: str
    beta: int
    baseline_params: int  # P: MobileNetV2's with this head
    chosen: ChosenNetwork
    finalists: list[Finalist]
    baseline_network: Finalist | None  # every pool MobileNetV2 (when it is a family), final shared weights
    baseline_test_accuracy: float | None
    warmup_losses: list[float]  # the warm-up's mean training loss per 50 batches
    history: list[NetworkRecord]  # every sampled network, in order
    steps: list[StepRecord]
    times: Times
    out_dir: str
    report: str

    @classmethod
    def load(cls, out_dir: str | Path) -> SearchResult:
        return cls.model_validate_json((Path(out_dir) / RESULT_FILE).read_text())
