"""The architecture search: a weight-sharing supernet trained on sampled paths, an LSTM controller
trained by policy gradient on their rewards, and the chosen network saved as ``nas:NAME``.

The loop (``run_search``):

1. **Data.** Three disjoint slices of a seeded permutation of Fashion-MNIST's training split:
   the proxy training images the shared weights train on, the validation images the rewards are
   measured on, and held-out test images, used only to report the chosen network. These are
   images a server may hold; the federated reward (``reward_source = "federated"``) measures on
   the phones' held-out slices instead.
2. **Supernet.** Built from the pretrained families; adapters by least squares on the first
   ``adapter_images`` training images (``Supernet.init_adapters``), and the shared classifier
   as a linear probe on the same images' head features of every family (``init_classifier``).
3. **Warm-up.** ``warmup_batches`` SGD batches, each on a uniformly random path.
4. **Search.** Each step samples ``samples_per_step`` networks (the controller's policy, or
   uniformly with ``strategy = "random"``, the baseline with the same budget); each trains its own
   path for ``batches_per_network`` batches, then its accuracy (the validator) gives its reward
   (``toolkit.nas.reward``); the controller takes one REINFORCE step on them.
5. **Final.** The ``top_k`` distinct networks with the highest rewards are re-evaluated with the
   final shared weights on the whole validation slice; the highest reward wins (the patent: "the
   network with the highest reward"). It is saved (``toolkit.models.saved``) and measured on the
   test slice; ``search.json`` and the report (``toolkit.nas.report``) are written.

**Resuming.** After the warm-up and after every controller step, the whole state (supernet,
controller, both optimizers, the generator's and torch's RNG states, the batch counter, every
record) is written to ``OUT/state.pt`` atomically; a run on the same folder with the same config
continues from it and ends exactly where an uninterrupted run would (the same choices and
rewards). A folder holding another config's search is refused. Training batches are a function
of the seed and the batch counter, so they need no state of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from toolkit.data import load_fashion_mnist, transform
from toolkit.errors import ConfigError
from toolkit.models.saved import PREFIX, save_network
from toolkit.nas.config import NASConfig
from toolkit.nas.controller import Controller, Reinforce, Sample
from toolkit.nas.result import RESULT_FILE, ChosenNetwork, Finalist, NetworkRecord, SearchResult, StepRecord, Times
from toolkit.nas.reward import FORMULA, reward
from toolkit.nas.space import Supernet, baseline_params

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
MOMENTUM = 0.9  # the shared weights' SGD
# Gradients of a sampled path clipped to this norm: uniformly random paths through untrained
# adapters diverged without it (measured with lr 0.0005 / 0.005: the loss at 60 and more within
# 120 warm-up batches, every path at chance after; the gradients' norms start at 3 to 9)
CLIP_NORM = 5.0
EVAL_BATCH = 250
WARMUP_SAVE_EVERY = 50  # warm-up batches between state saves


class Validator(Protocol):
    """Measures a sampled network's accuracy: on the server's validation images
    (``ServerValidator``), or on the phones' held-out slices (``toolkit.nas.fleet``)."""

    def accuracy(self, supernet: Supernet, choice: tuple[int, ...]) -> float: ...


class ServerValidator:
    """The supernet's path for ``choice`` on images the server holds (BatchNorm in eval as always)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    @torch.no_grad()
    def accuracy(self, supernet: Supernet, choice: tuple[int, ...]) -> float:
        was_training = supernet.training
        supernet.eval()
        correct = 0
        for at in range(0, len(self.labels), EVAL_BATCH):
            logits = supernet(self.images[at : at + EVAL_BATCH], choice)
            correct += int((logits.argmax(1) == self.labels[at : at + EVAL_BATCH]).sum())
        supernet.train(was_training)
        return correct / len(self.labels)


@dataclass(frozen=True)
class SearchProgress:
    """What ``run_search`` reports as it goes (``progress`` callback)."""

    phase: Literal["setup", "warm-up", "search", "final", "done"]
    done: int  # warm-up: batches done; search: controller steps done; final: finalists evaluated
    total: int
    last_reward: float | None = None
    best_reward: float | None = None
    best_arch: str | None = None


@dataclass
class _Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_slices(config: NASConfig) -> _Data:
    """The three disjoint slices of the training split, from the seeded permutation."""
    train = load_fashion_mnist("train")
    d = config.data
    order = np.random.default_rng(config.seed).permutation(len(train))
    parts = np.split(
        order[: d.train_images + d.val_images + d.test_images], [d.train_images, d.train_images + d.val_images]
    )
    tensors = [(torch.from_numpy(transform(train.images[p])), torch.from_numpy(train.labels[p])) for p in parts]
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = tensors
    return _Data(train_x, train_y, val_x, val_y, test_x, test_y)


class _Batches:
    """Training batch k, a function of (seed, k): epoch e = a permutation drawn from (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = max(1, n // batch_size)
        self._epoch = -1
        self._order = np.arange(n)

    def indices(self, k: int) -> np.ndarray:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._order[j * self.batch_size : (j + 1) * self.batch_size]


class _Search:
    """The state of one search and the steps that move it; ``run_search`` drives it."""

    def __init__(self, config: NASConfig, out_dir: Path, validator: Validator | None):
        self.config = config
        self.out_dir = out_dir
        self.data = load_slices(config)
        self.supernet = Supernet(config.families, seed=config.seed)
        self.P = baseline_params(self.supernet.num_classes)
        # the new parts (classifier, adapters) at new_lr; the pretrained blocks at lr, small: with
        # BatchNorm's statistics frozen they diverge at 0.01 (measured: the loss past 100 within 50
        # batches), as the demo's deeper stage does; and uniformly random paths pull the shared
        # blocks every way: at 0.0005 / 0.005 they undo what the probe gave the one-family paths
        # (~70 % → ~45 % in 120 batches), at 0.0001 / 0.001 they keep it
        fresh = [*self.supernet.classifier.parameters(), *self.supernet.adapters.parameters()]
        ids = {id(p) for p in fresh}
        pretrained = [p for p in self.supernet.parameters() if id(p) not in ids]
        groups = [{"params": pretrained, "lr": config.supernet.lr}, {"params": fresh, "lr": config.supernet.new_lr}]
        self.sgd = torch.optim.SGD(groups, momentum=MOMENTUM)
        c = config.controller
        self.controller = Controller(self.supernet.num_pools, len(config.families), c.hidden, seed=config.seed)
        self.reinforce = Reinforce(self.controller, c.lr, c.entropy_weight, c.baseline_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batches = _Batches(config.data.train_images, config.supernet.batch_size, config.seed)
        self.batch_counter = 0
        self.warmup_done = 0
        self.warmup_losses: list[float] = []  # mean training loss per WARMUP_SAVE_EVERY batches
        self.history: list[NetworkRecord] = []
        self.steps: list[StepRecord] = []
        self.times = Times()
        e = config.supernet.eval_images
        self.validator = validator or ServerValidator(self.data.val_x[:e], self.data.val_y[:e])
        self.final_validator = validator or ServerValidator(self.data.val_x, self.data.val_y)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.config.fingerprint(),
            "supernet": self.supernet.state_dict(),
            "sgd": self.sgd.state_dict(),
            "reinforce": self.reinforce.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "batch_counter": self.batch_counter,
            "warmup_done": self.warmup_done,
            "warmup_losses": self.warmup_losses,
            "history": [r.model_dump(mode="json") for r in self.history],
            "steps": [s.model_dump(mode="json") for s in self.steps],
            "times": self.times.model_dump(),
        }

    def save(self) -> None:
        tmp = self.out_dir / (STATE_FILE + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, self.out_dir / STATE_FILE)

    def restore(self, state: dict[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"])
        self.sgd.load_state_dict(state["sgd"])
        self.reinforce.load_state_dict(state["reinforce"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.batch_counter = state["batch_counter"]
        self.warmup_done = state["warmup_done"]
        self.warmup_losses = state["warmup_losses"]
        self.history = [NetworkRecord.model_validate(r) for r in state["history"]]
        self.steps = [StepRecord.model_validate(s) for s in state["steps"]]
        self.times = Times.model_validate(state["times"])

    # -- training --------------------------------------------------------------------------
    def train_batch(self, choice: tuple[int, ...]) -> float:
        idx = torch.from_numpy(self.batches.indices(self.batch_counter))
        self.batch_counter += 1
        self.supernet.train()
        loss = nn.functional.cross_entropy(self.supernet(self.data.train_x[idx], choice), self.data.train_y[idx])
        self.sgd.zero_grad(set_to_none=True)  # paths not taken keep no gradient: SGD leaves them alone
        loss.backward()
        nn.utils.clip_grad_norm_(self.supernet.path_parameters(choice), CLIP_NORM)
        self.sgd.step()
        return loss.item()

    def uniform_choice(self) -> tuple[int, ...]:
        n = len(self.config.families)
        return tuple(int(k) for k in torch.randint(n, (self.supernet.num_pools,), generator=self.generator))

    def record(
        self, step: int, sample: int, choice: tuple[int, ...], accuracy: float, train_loss: float
    ) -> NetworkRecord:
        params = self.supernet.params(choice)
        return NetworkRecord(
            step=step,
            sample=sample,
            choice=choice,
            arch_id=self.supernet.arch_id(choice),
            params=params,
            flops=self.supernet.flops(choice),
            accuracy=accuracy,
            reward=reward(accuracy, params, self.P, self.config.reward.beta),
            train_loss=train_loss,
        )

    def search_step(self, step: int, on_network: Callable[[NetworkRecord], None]) -> None:
        c = self.config
        samples: list[Sample] = []
        records = []
        for i in range(c.controller.samples_per_step):
            if c.strategy == "controller":
                samples.append(self.controller.sample(self.generator))
                choice = samples[-1].choice
            else:
                choice = self.uniform_choice()
            losses = [self.train_batch(choice) for _ in range(c.supernet.batches_per_network)]
            accuracy = self.validator.accuracy(self.supernet, choice)
            records.append(self.record(step, i, choice, accuracy, float(np.mean(losses))))
            self.history.append(records[-1])  # saved with the step: a step cut short is redone whole
            on_network(records[-1])
        rewards = [r.reward for r in records]
        baseline = entropy = loss = None
        if samples:
            loss = self.reinforce.update(samples, rewards)
            baseline = self.reinforce.baseline
            entropy = float(np.mean([s.entropy.item() for s in samples]))
        self.steps.append(
            StepRecord(
                step=step,
                mean_reward=float(np.mean(rewards)),
                max_reward=max(rewards),
                baseline=baseline,
                entropy=entropy,
                loss=loss,
            )
        )

    def finalist(self, choice: tuple[int, ...], search_reward: float | None) -> Finalist:
        accuracy = self.final_validator.accuracy(self.supernet, choice)
        params = self.supernet.params(choice)
        return Finalist(
            arch_id=self.supernet.arch_id(choice),
            choice=choice,
            params=params,
            mflops=self.supernet.flops(choice) / 1e6,
            search_reward=search_reward,
            accuracy=accuracy,
            reward=reward(accuracy, params, self.P, self.config.reward.beta),
        )

    def top_k(self) -> list[NetworkRecord]:
        """The distinct networks with the highest rewards (each by its best), best first."""
        best: dict[str, NetworkRecord] = {}
        for r in self.history:
            if r.arch_id not in best or r.reward > best[r.arch_id].reward:
                best[r.arch_id] = r
        return sorted(best.values(), key=lambda r: -r.reward)[: self.config.final.top_k]


def init_classifier(supernet: Supernet, images: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> None:
    """Fits the shared classifier as a linear probe: logistic regression on every family's own
    pooled head features of ``images`` (Adam, ``steps`` full-batch steps, a second at most).
    A fresh random head makes the warm-up's first hundreds of batches noise (measured: the loss
    still 2.25 after 150 random-path batches, every path near chance); with the probe, the
    one-family paths start at ~70 % and mixed ones ~30 %, and the warm-up trains from there."""
    with torch.no_grad():
        features = torch.cat([supernet.pool(acts[-1]) for acts in supernet.pool_outputs(images)])
    targets = labels.repeat(len(supernet.families))
    optimizer = torch.optim.Adam(supernet.classifier.parameters(), lr=0.01)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(supernet.classifier(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run_search(
    config: NASConfig,
    out_dir: str | Path,
    *,
    validator: Validator | None = None,
    progress: Callable[[SearchProgress], None] | None = None,
    models_dir: Path | None = None,
) -> SearchResult:
    """Runs (or continues) the search ``config`` describes in ``out_dir`` and saves the chosen
    network as ``nas:<config.name>`` (in ``models_dir``, default ``toolkit.models.saved.models_dir()``).

    ``validator`` measures each sampled network's accuracy (default: the supernet's path on the
    validation slice, the first ``eval_images`` of it during the search, all of it in the final
    phase). ``progress`` is called as the search goes; an exception it raises stops the search,
    which a later call continues from the last saved step."""
    out = Path(out_dir)
    report = progress or (lambda _: None)
    _claim_folder(config, out)
    if validator is None and config.reward_source == "federated":
        from toolkit.nas.fleet import fleet_validator  # the aggregator and phones: only when asked for

        _mark_folder(config, out)
        workdir = out / "fleet"  # the emulated fleet's, ours to replace: a resumed search starts a new one
        if workdir.exists():
            shutil.rmtree(workdir)
        with fleet_validator(config.fleet_config(), workdir) as fleet:
            return _run(config, out, fleet, report, models_dir)
    return _run(config, out, validator, report, models_dir)


def _run(
    config: NASConfig,
    out: Path,
    validator: Validator | None,
    report: Callable[[SearchProgress], None],
    models_dir: Path | None,
) -> SearchResult:
    report(SearchProgress("setup", 0, 1))
    t0 = time.monotonic()
    search = _Search(config, out, validator)
    _mark_folder(config, out)  # the data loaded: the folder is this search's from now on
    state_file = out / STATE_FILE
    if state_file.exists():
        search.restore(torch.load(state_file, map_location="cpu", weights_only=False))
    else:
        images = search.data.train_x[: config.data.adapter_images]
        search.supernet.init_adapters(images)
        init_classifier(search.supernet, images, search.data.train_y[: config.data.adapter_images])
        search.times.setup_s = time.monotonic() - t0
        search.save()

    # warm-up: uniformly random paths
    w = config.supernet.warmup_batches
    t = time.monotonic()
    losses: list[float] = []
    while search.warmup_done < w:
        losses.append(search.train_batch(search.uniform_choice()))
        search.warmup_done += 1
        if search.warmup_done % WARMUP_SAVE_EVERY == 0 or search.warmup_done == w:
            search.warmup_losses.append(float(np.mean(losses)))
            losses = []
            search.times.warmup_s += time.monotonic() - t
            t = time.monotonic()
            search.save()
        report(SearchProgress("warm-up", search.warmup_done, w))

    # the search: controller (or random) steps
    steps = config.controller.steps

    def tick(done: int) -> None:
        last = search.history[-1].reward if search.history else None
        top = max(search.history, key=lambda r: r.reward, default=None)
        best, arch = (None, None) if top is None else (top.reward, top.arch_id)
        report(SearchProgress("search", done, steps, last, best, arch))

    tick(len(search.steps))
    while len(search.steps) < steps:
        t = time.monotonic()
        done = len(search.steps)
        search.search_step(done + 1, lambda _: tick(len(search.steps)))  # the step is appended at its end
        search.times.search_s += time.monotonic() - t
        search.save()
        tick(done + 1)

    # final: the top k re-evaluated on the whole validation slice; the highest reward wins
    t = time.monotonic()
    candidates = search.top_k()
    finalists = []
    for i, r in enumerate(candidates):
        finalists.append(search.finalist(r.choice, r.reward))
        report(SearchProgress("final", i + 1, len(candidates), finalists[-1].reward))
    finalists.sort(key=lambda f: -f.reward)
    chosen = finalists[0]
    tester = ServerValidator(search.data.test_x, search.data.test_y)
    baseline_net = baseline_test = None
    if "mobilenet_v2" in config.families:
        baseline_choice = (config.families.index("mobilenet_v2"),) * search.supernet.num_pools
        seen = [r.reward for r in search.history if r.choice == baseline_choice]
        baseline_net = search.finalist(baseline_choice, max(seen, default=None))
        baseline_test = tester.accuracy(search.supernet, baseline_choice)
    test_accuracy = tester.accuracy(search.supernet, chosen.choice)
    extra = {
        "search": str(out.resolve()),
        "reward_formula": FORMULA,
        "beta": config.reward.beta,
        "reward": chosen.reward,
        "val_accuracy": chosen.accuracy,
        "test_accuracy": test_accuracy,
        "strategy": config.strategy,
        "reward_source": config.reward_source,
    }
    folder = save_network(search.supernet, chosen.choice, config.name, directory=models_dir, extra=extra)
    search.times.final_s = time.monotonic() - t
    result = SearchResult(
        name=config.name,
        strategy=config.strategy,
        reward_source=config.reward_source,
        families=config.families,
        seed=config.seed,
        reward_formula=FORMULA,
        beta=config.reward.beta,
        baseline_params=search.P,
        chosen=ChosenNetwork(
            arch_id=chosen.arch_id,
            choice=chosen.choice,
            description=search.supernet.describe(chosen.choice),
            blocks=search.supernet.block_names(chosen.choice),
            params=chosen.params,
            mflops=chosen.mflops,
            val_accuracy=chosen.accuracy,
            test_accuracy=test_accuracy,
            reward=chosen.reward,
            model_id=f"{PREFIX}{config.name}",
            saved_to=str(folder),
        ),
        finalists=finalists,
        baseline_network=baseline_net,
        baseline_test_accuracy=baseline_test,
        warmup_losses=search.warmup_losses,
        history=search.history,
        steps=search.steps,
        times=search.times,
        out_dir=str(out),
        report=str(out / "report" / "index.html"),
    )
    _write_json(out / RESULT_FILE, result.model_dump_json(indent=2))
    from toolkit.nas.report import build_report  # matplotlib: only once there is something to draw

    build_report(out, result)
    report(SearchProgress("done", 1, 1, chosen.reward, chosen.reward, chosen.arch_id))
    return result


def _claim_folder(config: NASConfig, out: Path) -> None:
    """Before any work: a new or empty folder will be this search's, one holding this config's
    search continues, anything else is refused."""
    marker = out / CONFIG_FILE
    if marker.exists():
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{marker} is not a search's config ({exc}): choose another --out") from exc
        ours = json.loads(config.fingerprint())
        if theirs != ours:
            differ = sorted(_differences(theirs, ours))
            raise ConfigError(
                f"{out} holds a search with another config (differing: {', '.join(differ)}): continue it with "
                "that config, or choose another --out"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not a search folder: remove it or choose another --out")


def _mark_folder(config: NASConfig, out: Path) -> None:
    """Makes ``out`` this config's search folder (once its inputs have loaded)."""
    if not (out / CONFIG_FILE).exists():
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / CONFIG_FILE, json.dumps(json.loads(config.fingerprint()), indent=2, sort_keys=True))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _write_json(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
