"""The shipped catalogue: enough classes, every figure sourced, derived figures consistent."""

from __future__ import annotations

import pytest

from toolkit.errors import PlanError
from toolkit.profiling import catalog_profiles, class_names, links
from toolkit.profiling.catalog import derived_figures, load_catalog

KINDS = {"published", "derived", "estimate"}


def _figures(node, path=""):
    """Every {"value": ...} object in the catalogue, with where it is."""
    if isinstance(node, dict):
        if "value" in node:
            yield path, node
        else:
            for key, child in node.items():
                yield from _figures(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _figures(child, f"{path}[{i}]")


def test_at_least_twelve_classes_from_low_end_to_flagship():
    data = load_catalog()
    tiers = {c["tier"] for c in data["classes"]}

    assert len(data["classes"]) >= 12
    assert {"entry", "low", "mid", "flagship"} <= tiers
    assert len(set(class_names())) == len(class_names())


def test_every_figure_names_a_kind_and_a_known_source():
    data = load_catalog()
    figures = list(_figures({k: v for k, v in data.items() if k != "sources"}))

    assert len(figures) > 12 * 8
    for path, figure in figures:
        assert figure["kind"] in KINDS, path
        assert figure["source"] in data["sources"], path
        if figure["kind"] == "derived":
            assert figure["how"], path
    for key, source in data["sources"].items():
        assert source["name"] and source["url"].startswith("https://"), key


@pytest.mark.parametrize("name", [c["name"] for c in load_catalog()["classes"]])
def test_derived_figures_match_their_rule(name):
    entry = next(c for c in load_catalog()["classes"] if c["name"] == name)

    for field, value in derived_figures(entry).items():
        assert entry[field]["value"] == pytest.approx(value), field
        assert entry[field]["kind"] == "derived"


def test_profiles_grow_with_the_tier():
    profiles = {p.name: p for p in catalog_profiles()}

    assert profiles["entry-2018"].gflops < profiles["mid-2022"].gflops < profiles["flagship-2024"].gflops
    assert profiles["entry-2018"].memory_mb < profiles["flagship-2024"].memory_mb
    assert all(p.link is not None and p.source == "catalog" for p in profiles.values())


def test_link_override_and_links():
    assert {"3g", "4g", "wifi"} <= set(links())
    assert links()["3g"].uplink_mbps < links()["4g"].uplink_mbps < links()["wifi"].uplink_mbps

    [profile] = catalog_profiles(["low-2019"], link_name="wifi")

    assert profile.link == links()["wifi"]


def test_unknown_class_and_link_are_refused():
    with pytest.raises(PlanError, match=r"unknown phone class.*choose from"):
        catalog_profiles(["pocket-calculator"])
    with pytest.raises(PlanError, match="unknown link 'carrier-pigeon'"):
        catalog_profiles(["low-2019"], link_name="carrier-pigeon")


def test_every_class_names_its_runtime_and_profiles_take_its_engines():
    data = load_catalog()
    profiles = {p.name: p for p in catalog_profiles()}

    for entry in data["classes"]:
        runtime = entry["runtime"]
        assert runtime["kind"] in KINDS and runtime["source"] in data["sources"], entry["name"]
        assert profiles[entry["name"]].engines == tuple(runtime["engines"]), entry["name"]
        assert runtime["value"] in profiles[entry["name"]].notes


def test_default_runtime_is_fedkits_python_phone_runtime_training_with_ort():
    # ExecuTorch's Python bindings import torch: a Python phone cannot run that engine
    runtimes = {(c["runtime"]["value"], tuple(c["runtime"]["engines"])) for c in load_catalog()["classes"]}

    assert runtimes == {("fedkit-python (Termux + Debian userland)", ("ort",))}
    assert all(p.engines == ("ort",) for p in catalog_profiles())
