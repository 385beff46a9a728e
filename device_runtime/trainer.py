"""One phone's local round: features once, then epochs of SGD on the trainable head.

The frozen part of the bundle runs once per shard: its outputs (features) are cached in the
work folder, keyed by the bundle hash and the shard digest, so every later round trains the
trainable part only. What a round starts from, how it is shuffled and encoded, and how it is
checkpointed and resumed is ``device_runtime.local_round``'s, shared with SplitTrainer.

An early-exit bundle trains the same way, its engine's loss being the weighted multi-exit one
(``train_loss`` is that sum); the local evaluation on the held-out slice reports the loss and
accuracy of the phone's deepest exit, the one it answers with when it runs the whole way.

Checkpoints: every ``checkpoint_every`` steps, at the end of the round, and once more with the
encoded update and its idempotency key before it is handed out for pushing. A killed trainer
resumes at the last checkpoint and ends with the same weights, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.engines import Engine
from device_runtime.errors import BundleError, DataError, FedkitError
from device_runtime.local_round import (
    FEATURE_BATCH,
    SHUFFLE,
    EncodedUpdate,
    Metrics,
    Phase,
    Position,
    RoundKey,
    RoundRecord,
    RoundTrainer,
    Task,
    Tensors,
    batches,
    update_of,
)
from device_runtime.optim import SGD

HOLDOUT_FRACTION = 0.1  # of a shard, held out for local evaluation (and validation probes)


def holdout_index(n: int, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """The held-out slice of a shard of ``n`` images, sorted: fixed (seed 0), so the phone's
    local evaluation and the validation probes it answers (``device_runtime.probes``) see the
    same images, round after round."""
    return np.sort(np.random.default_rng(0).permutation(n)[: int(n * fraction)])


@dataclass(frozen=True)
class RoundResult:
    round: int
    update: dict[str, np.ndarray]  # new weights − base weights
    num_samples: int  # training samples (the held-out slice excluded)
    steps: int
    train_loss: float  # mean cross-entropy over the round's batches, per sample (exits: the weighted sum)
    # on the held-out slice after training (an exit bundle: its deepest exit); None when nothing is held out
    eval_loss: float | None
    eval_accuracy: float | None
    feature_seconds: float  # frozen-part features: computed, or read from the cache
    train_seconds: float  # the optimisation steps, summed over restarts
    resumed: bool  # this process continued a checkpointed round


class LocalTrainer(RoundTrainer):
    """Trains one phone's shard on a verified bundle, checkpointing into ``workdir`` (which
    belongs to this trainer alone: one phone, one shard)."""

    def __init__(
        self,
        bundle: Bundle,
        shard_path: str | Path,
        workdir: str | Path,
        engine: Engine | None = None,
        *,
        device_id: str = "phone",
        holdout_fraction: float = HOLDOUT_FRACTION,  # of the shard, a fixed random slice for local evaluation
        checkpoint_every: int = 50,  # optimizer steps
    ) -> None:
        if bundle.manifest.is_splitfed:
            raise BundleError(
                f"bundle {bundle.root} is SplitFed "
                f"(cut {bundle.manifest.plan.cut} of {len(bundle.manifest.block_names)} blocks): "
                "its rounds need the edge; LocalTrainer trains bundles that hold the whole model"
            )
        if not 0 <= holdout_fraction < 1 or checkpoint_every < 1:
            raise FedkitError(
                f"holdout_fraction={holdout_fraction}, checkpoint_every={checkpoint_every}: "
                "use 0 ≤ holdout_fraction < 1 and checkpoint_every ≥ 1"
            )
        super().__init__(bundle, shard_path, workdir, engine, device_id, keep_features=True)
        self.checkpoint_every = checkpoint_every
        n = len(self.labels)
        held = holdout_index(n, holdout_fraction)
        self.eval_index = held
        self.train_index = np.setdiff1d(np.arange(n), held)
        if len(self.train_index) == 0:
            raise DataError(f"shard {self.shard_path} has {n} images, none left to train on: lower holdout_fraction")

    # -- a round ---------------------------------------------------------------------------
    def run_round(self, task: Task, global_weights: dict[str, np.ndarray]) -> RoundResult:
        """Trains from the global model's tensors (``global_weights``: this bundle's trainable
        ones, and those its frozen part is fed) as ``task`` says and returns the update;
        continues the round from the checkpoint when one of the same task and base is there."""
        key, base_weights, fed, record = self.start(task, global_weights)
        if record is not None and record.metrics is not None:  # trained, or encoded too
            return self._result(record, record.metrics, base_weights, resumed=True)
        h, feature_seconds, weights, opt, pos = self.resume(task, record, base_weights, fed)
        resumed = record is not None and record.phase == "training"
        self.engine.set_weights(weights)

        n = len(self.train_index)
        t0 = time.perf_counter()
        for picked, at in batches(task, n, pos, lambda e: self.rng(task, SHUFFLE, e)):
            idx = self.train_index[picked]  # gathered per batch: no copy of all features
            loss, grads = self.engine.gradients(h[idx], self.labels[idx])
            weights = opt.step(weights, grads)
            self.engine.set_weights(weights)
            pos = pos.after(at, float(loss), len(idx), time.perf_counter() - t0)
            t0 = time.perf_counter()
            if pos.step % self.checkpoint_every == 0:
                self._save(key, weights, opt, pos)

        eval_loss, eval_accuracy = self._evaluate(h)
        metrics = Metrics(n, pos.train_loss, feature_seconds, eval_loss, eval_accuracy)
        return self._result(self._save(key, weights, opt, pos, metrics), metrics, base_weights, resumed)

    def encode_update(self, task: Task, result: RoundResult) -> EncodedUpdate:
        """The round's update compressed for pushing, checkpointed before it is returned; for a
        round already encoded, the same bytes and key again."""
        return self.encode(task, result.num_samples, result.update)

    def _evaluate(self, h: np.ndarray) -> tuple[float | None, float | None]:
        if len(self.eval_index) == 0:
            return None, None
        logits = np.concatenate(
            [
                self.engine.forward(h[self.eval_index[i : i + FEATURE_BATCH]])
                for i in range(0, len(self.eval_index), FEATURE_BATCH)
            ]
        ).astype(np.float64)
        if self.bundle.manifest.has_exits:  # (batch, exits, classes): the deepest exit's
            logits = logits[:, -1]
        y = self.labels[self.eval_index]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())

    def _save(
        self, key: RoundKey, weights: Tensors, opt: SGD, pos: Position, metrics: Metrics | None = None
    ) -> RoundRecord:
        phase: Phase = "training" if metrics is None else "trained"
        record = RoundRecord(key, phase, weights, opt.state_dict(), pos, self.error_feedback.state_dict(), metrics)
        self.checkpoint.save(record)
        return record

    def _result(self, record: RoundRecord, metrics: Metrics, base_weights: Tensors, resumed: bool) -> RoundResult:
        return RoundResult(
            round=record.key.task.round,
            update=update_of(record, base_weights),
            num_samples=metrics.num_samples,
            steps=record.position.step,
            train_loss=metrics.train_loss,
            eval_loss=metrics.eval_loss,
            eval_accuracy=metrics.eval_accuracy,
            feature_seconds=metrics.feature_seconds,
            train_seconds=record.position.train_seconds,
            resumed=resumed,
        )
