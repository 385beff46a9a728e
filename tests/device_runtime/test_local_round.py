"""The core both trainers share: the checkpointed round record (a round trip of every phase,
records of earlier runtimes, records that do not fit refused with a clear message), the
position and batches a resumed round goes on from, the seeded generators, the features (on
disk or in memory, the same numbers), and the error feedback and encoding a restarted trainer
picks up from its checkpoint."""

import json

import numpy as np
import pytest

from device_runtime.bundle import Bundle
from device_runtime.checkpoint import load_checkpoint, save_checkpoint
from device_runtime.errors import CheckpointError, InternalError
from device_runtime.local_round import (
    CHECKPOINT,
    ROUNDING,
    SHUFFLE,
    EncodedUpdate,
    Metrics,
    Position,
    RoundCheckpoint,
    RoundKey,
    RoundRecord,
    RoundTrainer,
    Task,
    batches,
)
from toolkit.data import write_shard

TASK = Task(round=3, base_version=2, lr=0.05, local_epochs=2, batch_size=4, encoding="int8", seed=1)
KEY = RoundKey(TASK, "ab" * 32)
WEIGHTS = {"classifier.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "classifier.bias": np.ones(2, np.float32)}


def records() -> dict[str, RoundRecord]:
    residuals = {"classifier.bias": np.full(2, 0.25, np.float32)}
    training = RoundRecord(
        KEY,
        "training",
        WEIGHTS,
        {"classifier.bias": np.zeros(2, np.float32)},
        Position(1, 2, 7, 9.5, 28, 0.5),
        residuals,
    )
    trained = RoundRecord(
        KEY, "trained", WEIGHTS, {}, Position(2, 0, 10, 12.0, 40, 1.5), residuals, Metrics(40, 0.3, 0.2, 0.4, 0.75)
    )
    encoded = RoundRecord(
        KEY,
        "encoded",
        WEIGHTS,
        {},
        Position(2, 0, 10, 12.0, 40, 1.5, activation_bytes=99, restarts=1),
        residuals,
        Metrics(40, 0.3, 0.2),
        EncodedUpdate(TASK.round, b"\x00update", "p:3:0123"),
        feedback_before={},
    )
    restart = RoundRecord(KEY, "restart", {}, {}, Position(), residuals)
    return {"training": training, "trained": trained, "encoded": encoded, "restart": restart}


def assert_same(got: RoundRecord, expected: RoundRecord) -> None:
    for name in ("key", "phase", "position", "metrics", "encoded"):
        assert getattr(got, name) == getattr(expected, name), name
    for name in ("weights", "optimizer", "error_feedback", "feedback_before"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        for tensor in b or {}:
            assert a[tensor].dtype == b[tensor].dtype
            np.testing.assert_array_equal(a[tensor], b[tensor])
        assert set(a or {}) == set(b or {}), name


# -- the record ------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["training", "trained", "encoded", "restart"])
def test_a_record_of_every_phase_round_trips_through_its_checkpoint_file(tmp_path, phase):
    record = records()[phase]
    RoundCheckpoint(tmp_path / CHECKPOINT).save(record)

    loaded = RoundCheckpoint(tmp_path / CHECKPOINT)

    assert loaded.record is not None
    assert_same(loaded.record, record)
    assert loaded.of(KEY) is loaded.record
    assert loaded.of(RoundKey(TASK, "cd" * 32)) is None  # other base weights: another round


def test_the_file_keeps_the_layout_earlier_runtimes_and_the_kill_tests_read(tmp_path):
    RoundCheckpoint(tmp_path / CHECKPOINT).save(records()["encoded"])

    state = load_checkpoint(tmp_path / CHECKPOINT)

    assert state["round_key"] == {"task": TASK.to_dict(), "base_digest": "ab" * 32}
    assert (state["phase"], state["position"]["step"], state["metrics"]["num_samples"]) == ("encoded", 10, 40)
    assert (state["payload"], state["idempotency_key"]) == (b"\x00update", "p:3:0123")


def test_a_record_of_an_earlier_local_trainer_loads_with_the_edge_counters_at_zero(tmp_path):
    # As LocalTrainer wrote it before the record was typed: no edge counters, no feedback_before
    save_checkpoint(
        tmp_path / CHECKPOINT,
        {
            "round_key": {"task": TASK.to_dict(), "base_digest": "ab" * 32},
            "phase": "training",
            "weights": WEIGHTS,
            "optimizer": {},
            "position": {"epoch": 1, "batch": 2, "step": 7, "loss_sum": 9.5, "seen": 28, "train_seconds": 0},
            "error_feedback": {},
        },
    )

    record = RoundCheckpoint(tmp_path / CHECKPOINT).of(KEY)

    assert record is not None and record.phase == "training"
    assert record.position == Position(1, 2, 7, 9.5, 28, 0.0)
    assert record.metrics is None and record.encoded is None and record.feedback_before is None


def _saved(**change) -> dict:
    state = records()["encoded"].to_dict()
    state.update(change)
    return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize(
    "state, says",
    [
        (_saved(phase="paused"), "phase 'paused'"),
        (_saved(round_key=None), "round_key is NoneType"),
        (_saved(round_key={"task": TASK.to_dict()}), "not a task and a base_digest"),
        (_saved(round_key={"task": {**TASK.to_dict(), "lr": 0.0}, "base_digest": "ab"}), "impossible round"),
        (_saved(position={"step": "7"}), "position.step is '7', not int"),
        (_saved(position={"step": True}), "position.step is True"),
        (_saved(metrics={"num_samples": 40}), "metrics: .*missing"),
        (
            _saved(metrics={"num_samples": 40, "train_loss": 0.3, "feature_seconds": 0.2, "accuracy": 1.0}),
            "unknown fields accuracy",
        ),
        (_saved(payload=None), "lacks its payload"),
        (_saved(weights={"w": [1.0, 2.0]}), "weights holds values that are not arrays"),
        (_saved(momentum={}), "unknown fields momentum"),
    ],
)
def test_a_record_that_does_not_fit_is_refused_saying_what_and_what_to_do(tmp_path, state, says):
    save_checkpoint(tmp_path / CHECKPOINT, state)

    with pytest.raises(
        CheckpointError, match=f"{CHECKPOINT} holds no round record of this runtime \\(.*{says}"
    ) as refused:
        RoundCheckpoint(tmp_path / CHECKPOINT)
    assert "delete it to start the round over" in str(refused.value)


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT
    np.savez(path, __meta__=np.frombuffer(json.dumps({"format_version": 2, "state": {}}).encode(), np.uint8))

    with pytest.raises(CheckpointError, match="format 2, this runtime reads 1: delete it"):
        RoundCheckpoint(path)


# -- position, batches and generators ----------------------------------------------------------


def test_a_position_adds_each_step_and_keeps_the_mean_loss():
    pos = Position(activation_bytes=5).after((0, 1), 2.0, 4, 0.5).after((1, 0), 1.0, 2, 0.25)

    assert pos == Position(1, 0, 2, 10.0, 6, 0.75, activation_bytes=5)
    assert pos.train_loss == pytest.approx(10 / 6)


def test_batches_resumed_at_a_position_are_the_rest_of_the_uninterrupted_ones():
    task = Task(**{**TASK.to_dict(), "local_epochs": 3, "batch_size": 4})

    def shuffle(epoch):
        return np.random.default_rng([5, epoch])

    every = [(picked.tolist(), at) for picked, at in batches(task, 10, Position(), shuffle)]
    rest = [(picked.tolist(), at) for picked, at in batches(task, 10, Position(epoch=1, batch=2), shuffle)]

    assert len(every) == 9 and every[2][1] == (1, 0) and len(every[2][0]) == 2  # 3 batches an epoch, the last short
    assert rest == every[5:]
    assert sorted(i for picked, _ in every[:3] for i in picked) == list(range(10))


# -- the trainers' core on a bundle -----------------------------------------------------------


@pytest.fixture(scope="module")
def head_bundle(small_cnn_bundle):
    return Bundle.load(small_cnn_bundle(train_blocks=2))  # a frozen part, so features are not the input


@pytest.fixture
def shard(tmp_path, fashion_train):
    return write_shard(tmp_path / "shard.npz", fashion_train.images[:40], fashion_train.labels[:40])


def core(bundle, shard, workdir, device_id="p", keep_features=True):
    return RoundTrainer(bundle, shard, workdir, None, device_id, keep_features=keep_features)


def test_features_on_disk_and_in_memory_are_the_same_numbers(head_bundle, shard, tmp_path):
    on_disk = core(head_bundle, shard, tmp_path / "disk").features()
    again = core(head_bundle, shard, tmp_path / "disk").features()  # read from the cache
    in_memory = core(head_bundle, shard, tmp_path / "memory", keep_features=False).features()

    assert on_disk.shape[0] == 40 and on_disk.dtype == np.float32
    np.testing.assert_array_equal(again, on_disk)
    np.testing.assert_array_equal(in_memory, on_disk)
    assert len(list((tmp_path / "disk").glob("features-*.npy"))) == 1
    assert not list((tmp_path / "memory").glob("features-*"))


def test_generators_are_seeded_by_task_round_device_and_stream(head_bundle, shard, tmp_path):
    a, b = core(head_bundle, shard, tmp_path / "a", "a"), core(head_bundle, shard, tmp_path / "b", "b")

    def draw(trainer, task=TASK, stream=SHUFFLE, *more):
        return trainer.rng(task, stream, *more).integers(1 << 30, size=4).tolist()

    assert draw(a) == draw(core(head_bundle, shard, tmp_path / "a2", "a"))
    others = [
        draw(b),
        draw(a, Task(**{**TASK.to_dict(), "seed": 2})),
        draw(a, Task(**{**TASK.to_dict(), "round": 4})),
        draw(a, TASK, ROUNDING),
        draw(a, TASK, SHUFFLE, 1),
    ]
    assert all(o != draw(a) for o in others)


def test_a_trained_round_is_resumed_encoded_once_and_its_residuals_restored(head_bundle, shard, tmp_path):
    # Prepare: a round saved mid-training, then as trained
    trainer = core(head_bundle, shard, tmp_path)
    base = {t.name: np.zeros(t.shape, np.float32) for t in head_bundle.manifest.trainable}
    weights = {name: w + 0.01 for name, w in base.items()}
    key = RoundKey.of(TASK, base)
    with pytest.raises(InternalError, match="before run_round finished"):
        trainer.encode(TASK, 40, weights)
    momentum = {name: np.full_like(w, 0.5) for name, w in base.items()}
    trainer.checkpoint.save(RoundRecord(key, "training", weights, momentum, Position(0, 3, 3, 6.0, 12, 0.1), {}))
    restarted = core(head_bundle, shard, tmp_path)
    _, _, resumed, opt, pos = restarted.resume(TASK, restarted.checkpoint.of(key), base, {})
    _, _, fresh, _, start = restarted.resume(TASK, None, base, {})
    restarted.checkpoint.save(RoundRecord(key, "trained", weights, {}, pos, {}, Metrics(40, 0.5, 0.1)))

    # Execute: encode, then ask again from a trainer restarted on the same folder
    encoded = restarted.encode(TASK, 40, weights, restartable=True)
    residuals = restarted.error_feedback.state_dict()
    again = core(head_bundle, shard, tmp_path)

    # Assert
    assert pos == Position(0, 3, 3, 6.0, 12, 0.1) and start == Position()
    np.testing.assert_array_equal(opt.state_dict()[next(iter(momentum))], 0.5)
    for name in base:
        np.testing.assert_array_equal(resumed[name], weights[name])
        np.testing.assert_array_equal(fresh[name], base[name])
    assert (
        again.encode(TASK, 40, {name: w * 0 for name, w in weights.items()}) == encoded
    )  # the same bytes, not a new encoding
    assert encoded.idempotency_key.startswith("p:3:")
    assert any(np.any(r) for r in residuals.values())  # int8 leaves residuals
    for name, r in residuals.items():
        np.testing.assert_array_equal(again.error_feedback.state_dict()[name], r)
    record = again.checkpoint.record
    assert record is not None and record.feedback_before == {} and record.optimizer == {}
