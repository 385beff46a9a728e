from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.benchmarking import BenchmarkRecord, benchmark_record
from toolkit.central import feature_cache_path, features, train_central
from toolkit.data import transform
from toolkit.errors import ConfigError, DataError
from toolkit.models import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKIT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_features_are_the_backbone_outputs_in_eval_mode(cache, small_cnn, fashion_test):
    images = fashion_test.images[:300]
    small_cnn.root.train()  # features must not depend on the mode the caller left the model in

    got = features(small_cnn, images, stop_block=2, batch_size=64)

    small_cnn.root.eval()
    with torch.no_grad():
        expected = small_cnn.part(0, 2)(torch.from_numpy(transform(images))).numpy()
    assert got.dtype == np.float32 and got.shape == (300, 16, 8, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_features_leave_the_model_mode_alone(cache, small_cnn, fashion_test):
    small_cnn.root.train()
    features(small_cnn, fashion_test.images[:10], stop_block=3)
    assert all(m.training for m in small_cnn.root.modules())
    small_cnn.root.eval()


def test_second_call_reads_the_cache(cache, small_cnn, fashion_test):
    images = fashion_test.images[:100]
    first = features(small_cnn, images, stop_block=4)
    path = feature_cache_path(small_cnn, images, stop_block=4)
    assert path.is_file() and path.is_relative_to(cache)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temp files
    np.testing.assert_array_equal(np.load(path), first)

    # mark the cached copy: what comes back must be it, not a recomputation
    np.save(path, np.full_like(first, 7.0))
    np.testing.assert_array_equal(features(small_cnn, images, stop_block=4), 7.0)
    # without the cache it is recomputed
    np.testing.assert_array_equal(features(small_cnn, images, stop_block=4, use_cache=False), first)


def test_cache_key_follows_everything_that_changes_the_features(cache, small_cnn, fashion_test):
    images = fashion_test.images[:50]
    base = feature_cache_path(small_cnn, images, stop_block=3)
    assert feature_cache_path(small_cnn, images, stop_block=2) != base
    assert feature_cache_path(small_cnn, fashion_test.images[50:100], stop_block=3) != base
    other = load_model("small_cnn", seed=1)  # another random backbone
    assert feature_cache_path(other, images, stop_block=3) != base
    # the head comes after the stop block: retraining it keeps the cached features valid
    other.root.load_state_dict(small_cnn.root.state_dict())
    with torch.no_grad():
        other.root.classifier.weight.add_(1.0)
    assert feature_cache_path(other, images, stop_block=3) == base


def test_an_exit_models_features_are_its_frozen_parts_rows_cached_apart(cache, fashion_test):
    images = fashion_test.images[:50]
    model = load_model("small_cnn+exits:1,2")

    got = features(model, images, stop_block=3)

    with torch.no_grad():
        expected = model.frozen_part(3)(torch.from_numpy(transform(images))).numpy()
    assert got.shape == (50, 8 * 16 * 16 + 16 * 8 * 8 + 32 * 4 * 4)  # the taps at 1 and 2, then the activation
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the same backbone, other exits: other rows, so another cache entry
    plain, other = load_model("small_cnn"), load_model("small_cnn+exits:2")
    paths = {feature_cache_path(m, images, stop_block=3) for m in (model, plain, other)}
    assert len(paths) == 3


def test_unreadable_cache_file_is_recomputed(cache, small_cnn, fashion_test):
    images = fashion_test.images[:20]
    expected = features(small_cnn, images, stop_block=4, use_cache=False)
    path = feature_cache_path(small_cnn, images, stop_block=4)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npy file")
    np.testing.assert_array_equal(features(small_cnn, images, stop_block=4), expected)
    np.testing.assert_array_equal(np.load(path), expected)


def test_a_cache_entry_of_another_layout_is_recomputed(cache, fashion_test):
    # An exit model's features written by an older fedkit were the plain activation (N, C, H, W)
    # under the same key; its frozen part now returns taps + activation as flat rows.
    images = fashion_test.images[:20]
    model = load_model("small_cnn+exits:1,2")
    expected = features(model, images, stop_block=3, use_cache=False)
    path = feature_cache_path(model, images, stop_block=3)
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((20, 32, 4, 4), np.float32))  # the plain activation's layout

    got = features(model, images, stop_block=3)

    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.load(path), expected)  # and the entry is replaced


def test_no_images_is_an_error(cache, small_cnn):
    with pytest.raises(DataError, match="no images"):
        features(small_cnn, np.zeros((0, 28, 28), np.uint8), stop_block=4)


@pytest.mark.slow
def test_train_central_learns_and_repeats_from_the_cache(cache):
    settings = dict(epochs=2, max_train=1000, max_test=300)

    first = train_central("mobilenet_v2", **settings)
    second = train_central("mobilenet_v2", **settings)

    assert len(first.test_accuracy) == len(first.train_loss) == 2
    assert first.final_accuracy > 0.5  # chance is 0.1
    assert first.train_loss[1] < first.train_loss[0]
    assert not first.cache_hit and second.cache_hit
    assert second.test_accuracy == first.test_accuracy  # seeded: the same run again
    assert first.extracted_images == 1300
    assert first.config["seed"] == 0 and first.config["torch"] == torch.__version__
    assert first.figures()["final_accuracy"] == first.final_accuracy


def test_result_file_round_trip(cache, tmp_path):
    result = train_central("small_cnn", epochs=1, max_train=200, max_test=100)
    record = benchmark_record("central", result.config, result.figures())
    path = record.write(tmp_path / "results" / "central.json")
    assert BenchmarkRecord.read(path).to_json() == record.to_json()


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"epochs": 0}, "epochs must be at least 1"), ({"max_train": 0}, "max_train"), ({"lr": 0.0}, "learning rate")],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        train_central("small_cnn", **settings)
