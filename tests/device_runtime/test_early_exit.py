"""Early-exit inference on the phone: the predictor decides as the torch model's logits do through
early_exit_curve's rule, runs each segment only on the images still in flight, refuses a folder
whose files are missing or altered, and runs without torch."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from early_exit_helpers import between, predict_argv, torch_logits, trained_exit_model

from device_runtime.early_exit import (
    INDEX,
    EarlyExitPredictor,
    confidence,
    early_exit_curve,
    exit_taken,
    final_exit_alone,
)
from device_runtime.errors import BundleError, EngineError
from exporters.early_exit import export_early_exit
from toolkit.data import LABEL_NAMES
from toolkit.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEST_IMAGES = 400
NEVER = {"max_softmax": 1.01, "entropy": -1.0}  # no image is that confident: all go to the final exit
ALWAYS = {"max_softmax": 0.0, "entropy": np.inf}  # every image leaves at the first exit


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fashion_train, fashion_test):
    """(the trained small_cnn+exits:1,2, its early-exit folder, test images, labels, torch's logits)."""
    model = trained_exit_model(fashion_train.images[:2000], fashion_train.labels[:2000])
    folder = tmp_path_factory.mktemp("early_exit") / "small_cnn"
    export_early_exit(model, folder, label_names=LABEL_NAMES)
    images, labels = fashion_test.images[:TEST_IMAGES], fashion_test.labels[:TEST_IMAGES]
    return model, folder, images, labels, torch_logits(model, images)


def thresholds(logits: np.ndarray, criterion: str) -> list[float]:
    """Thresholds that send some images out at each exit: quantiles of the first exit's confidence."""
    first = confidence(logits[:, 0], criterion)
    return [ALWAYS[criterion], *(between(first, q) for q in (0.2, 0.5, 0.8)), NEVER[criterion]]


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_the_predictor_decides_as_the_torch_models_logits_through_the_curves_rule(exported, criterion):
    # Prepare
    model, folder, images, _, logits = exported
    predictor = EarlyExitPredictor(folder)
    exit_flops = [s.flops for s in model.exit_stats()]
    spread = set()

    for t in thresholds(logits, criterion):
        # Execute
        prediction = predictor.predict(images, t, criterion)

        # Assert
        taken = exit_taken(logits, t, criterion)
        np.testing.assert_array_equal(prediction.exit_index, taken)
        np.testing.assert_array_equal(prediction.labels, logits[np.arange(len(images)), taken].argmax(1))
        np.testing.assert_array_equal(prediction.flops, np.array(exit_flops)[taken])
        assert prediction.exits == (1, 2, 5)
        spread |= set(taken.tolist())
    assert spread == {0, 1, 2}  # the thresholds sent images out at every exit
    np.testing.assert_allclose(predictor.logits(images), logits, atol=1e-4)


def test_prepared_float32_images_predict_as_the_uint8_ones(exported):
    _, folder, images, _, logits = exported
    predictor = EarlyExitPredictor(folder)
    t = between(confidence(logits[:, 0], "max_softmax"), 0.5)

    from_uint8 = predictor.predict(images, t)
    from_float = predictor.predict(predictor.prepare(images), t)

    np.testing.assert_array_equal(from_uint8.labels, from_float.labels)
    np.testing.assert_array_equal(from_uint8.exit_index, from_float.exit_index)
    with pytest.raises(ValueError, match="prepared float32"):
        predictor.predict(predictor.prepare(images)[:, :1], t)


def test_only_the_images_in_flight_run_the_next_segment(exported):
    _, folder, images, _, logits = exported
    t = between(confidence(logits[:, 0], "max_softmax"), 0.5)

    prediction = EarlyExitPredictor(folder).predict(images, t, batch=64)

    still_in_flight = tuple(int((prediction.exit_index >= k).sum()) for k in range(3))
    assert prediction.ran == still_in_flight
    assert still_in_flight[0] == len(images) > still_in_flight[1] > 0


def test_images_that_all_leave_at_the_first_exit_never_open_the_later_segments(exported, tmp_path):
    # Prepare: a verified folder whose later segments are then deleted
    _, folder, images, _, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    predictor = EarlyExitPredictor(copy)
    for segment in predictor.index.segments[1:]:
        (copy / segment.file.path).unlink()

    # Execute
    prediction = predictor.predict(images, ALWAYS["max_softmax"])

    # Assert
    assert (prediction.exit_index == 0).all() and prediction.ran == (len(images), 0, 0)
    assert prediction.mean_mflops == pytest.approx(predictor.index.segments[0].flops / 1e6)
    with pytest.raises(EngineError, match="segment_1"):  # an image that goes on needs the deleted file
        predictor.predict(images, NEVER["max_softmax"])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_index(folder, edit):
    data = json.loads((folder / INDEX).read_text())
    edit(data)
    (folder / INDEX).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip_a_byte(d / "segment_1_exit_2.onnx"), r"segment_1_exit_2.onnx \(exit 2\) does not match"),
        (lambda d: (d / "segment_2_exit_5.onnx").unlink(), r"segment_2_exit_5.onnx \(exit 5\) is missing"),
        (lambda d: (d / "segment_0_exit_1.onnx").write_bytes(b""), "truncated or altered"),
        (lambda d: (d / INDEX).unlink(), "not an early-exit export"),
        (lambda d: (d / INDEX).write_text("{"), "not valid JSON"),
        (lambda d: _edit_index(d, lambda x: x.update(schema_version=9)), "schema version 9"),
        (lambda d: _edit_index(d, lambda x: x.pop("segments")), "malformed"),
        (lambda d: _edit_index(d, lambda x: x["segments"][0].update(flops="many")), "needs integers"),
        (lambda d: _edit_index(d, lambda x: x["segments"].reverse()), "increasing positions"),
        (lambda d: _edit_index(d, lambda x: x["segments"][0]["file"].update(path="../x.onnx")), "outside the folder"),
    ],
)
def test_a_missing_or_altered_folder_is_refused_when_opened(exported, tmp_path, damage, message):
    _, folder, *_ = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    damage(copy)

    with pytest.raises(BundleError, match=message):
        EarlyExitPredictor(copy)


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_the_curves_endpoints_are_the_first_and_the_final_exit(exported, criterion):
    # Prepare
    model, folder, _, labels, logits = exported
    index = EarlyExitPredictor(folder).index
    accuracy = [(logits[:, k].argmax(1) == labels).mean() for k in range(3)]
    plain_flops = sum(s.flops for s in model.stats)

    # Execute
    always, never = early_exit_curve(logits, labels, index.flops, (ALWAYS[criterion], NEVER[criterion]), criterion)
    alone = final_exit_alone(logits, labels, index.segments[-1].alone_flops)

    # Assert
    assert (always.accuracy, always.mean_mflops, always.exit_shares) == (
        pytest.approx(accuracy[0]),
        pytest.approx(model.exit_stats()[0].flops / 1e6),
        (1.0, 0.0, 0.0),
    )
    assert (never.accuracy, never.mean_mflops, never.exit_shares) == (
        pytest.approx(accuracy[2]),
        pytest.approx(model.exit_stats()[-1].flops / 1e6),
        (0.0, 0.0, 1.0),
    )
    assert (alone.threshold, alone.accuracy, alone.mean_mflops, alone.exit_shares) == (
        None,
        pytest.approx(accuracy[2]),
        pytest.approx(plain_flops / 1e6),  # the model without its branches
        (0.0, 0.0, 1.0),
    )


def test_the_curve_by_hand():
    # two exits, three classes; image 0 is sure at the first exit, image 1 only at the last
    logits = np.array([[[9.0, 0, 0], [0, 9, 0]], [[0.0, 0, 0], [0, 0, 9]]])
    labels = np.array([0, 1])

    (low, high) = early_exit_curve(logits, labels, [100e6, 300e6], (0.9, 1.01))

    assert (low.accuracy, low.mean_mflops, low.exit_shares) == (0.5, 200.0, (0.5, 0.5))  # image 1 is wrong
    assert (high.accuracy, high.mean_mflops, high.exit_shares) == (0.0, 300.0, (0.0, 1.0))
    # the default grid, from the cheapest threshold to the dearest
    grid = early_exit_curve(logits, labels, [100e6, 300e6])
    assert len(grid) == 10 and [p.mean_mflops for p in grid] == sorted(p.mean_mflops for p in grid)


def test_confidence_by_hand():
    uniform, sure = np.zeros((1, 10)), np.array([[50.0] + [0.0] * 9])

    assert confidence(uniform, "max_softmax")[0] == pytest.approx(0.1)
    assert confidence(uniform, "entropy")[0] == pytest.approx(np.log(10))
    assert confidence(sure, "max_softmax")[0] == pytest.approx(1.0)
    assert confidence(sure, "entropy")[0] == pytest.approx(0.0, abs=1e-18)
    with pytest.raises(ValueError, match="max_softmax, entropy"):
        confidence(uniform, "margin")


# Runs in the child: torch cannot be imported; the predictor predicts and says what got imported.
NO_TORCH = """
import importlib.abc, json, sys
import numpy as np

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is not installed on a phone")

sys.meta_path.insert(0, NoTorch())
from device_runtime.early_exit import EarlyExitPredictor

images = np.load(sys.argv[2])
prediction = EarlyExitPredictor(sys.argv[1]).predict(images, float(sys.argv[3]))
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({"exits": prediction.exit_index.tolist(), "torch": loaded}))
"""


def test_the_predictor_runs_without_torch(exported, tmp_path):
    _, folder, images, _, logits = exported
    np.save(tmp_path / "images.npy", images[:50])
    t = between(confidence(logits[:50, 0], "max_softmax"), 0.5)

    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(folder), str(tmp_path / "images.npy"), repr(t)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report == {"exits": exit_taken(logits[:50], t, "max_softmax").tolist(), "torch": []}


@pytest.mark.slow
def test_mobilenet_v2_with_its_default_exits_decides_as_torch_does(tmp_path, fashion_test):
    # Prepare: MobileNetV2's fresh branches and head, on 200 test images
    model = load_model("mobilenet_v2+exits")
    export_early_exit(model, tmp_path / "mobilenet", label_names=LABEL_NAMES)
    images = fashion_test.images[:200]
    logits = torch_logits(model, images)
    predictor = EarlyExitPredictor(tmp_path / "mobilenet")
    assert predictor.index.exits == (7, 11, 14, 17, 21)

    for q in (0.3, 0.7):
        t = between(confidence(logits[:, 0], "max_softmax"), q)
        # Execute
        prediction = predictor.predict(images, t)
        # Assert
        np.testing.assert_array_equal(prediction.exit_index, exit_taken(logits, t, "max_softmax"))
        np.testing.assert_array_equal(prediction.labels, logits[np.arange(200), prediction.exit_index].argmax(1))


def test_the_phones_predict_command_prints_each_images_exit_and_the_accuracy(exported, tmp_path):
    # Prepare: a shard-format .npz of test images and labels, a threshold inside the first
    # exit's confidences so images leave at more than one exit
    _, folder, images, labels, logits = exported
    np.savez(tmp_path / "images.npz", images=images[:100], labels=labels[:100])
    t = between(confidence(logits[:100, 0], "max_softmax"), 0.5)

    # Execute: as on a phone, python -m device_runtime predict
    run = subprocess.run(
        [sys.executable, *predict_argv(folder, tmp_path / "images.npz", t)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Assert: the same decisions as the curve's rule on torch's logits
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    taken = exit_taken(logits[:100], t, "max_softmax")
    positions = EarlyExitPredictor(folder).index.exits
    assert report["exits"] == [positions[i] for i in taken] and len(set(report["exits"])) > 1
    predicted = logits[:100][np.arange(100), taken].argmax(1)
    assert report["labels"] == predicted.tolist()
    assert report["accuracy"] == pytest.approx(float((predicted == labels[:100]).mean()))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ({"pictures": np.zeros((2, 28, 28), np.uint8)}, "is not an .npz with an 'images' array"),
        (None, "is not an .npz"),
    ],
)
def test_the_phones_predict_command_refuses_a_bad_images_file_in_one_line(exported, tmp_path, content, says):
    _, folder, *_ = exported
    path = tmp_path / "images.npz"
    if content is None:
        path.write_bytes(b"not a zip")
    else:
        np.savez(path, **content)

    run = subprocess.run(
        [sys.executable, *predict_argv(folder, path, 0.5)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: ") and says in run.stderr and len(run.stderr.splitlines()) == 1
