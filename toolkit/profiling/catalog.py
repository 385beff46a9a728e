"""The device catalogue: phone classes from entry level to flagship, and typical links.

The data is ``catalog.json`` beside this module. Every figure there is an object
``{"value", "kind", "source", ...}``: kind ``published`` (a spec page states it), ``derived``
(computed by the rule in ``how``; ``derived_figures`` recomputes it) or ``estimate``; source is
a key of the file's ``sources`` (name and URL).

Each class also names the ``runtime`` it assumes, a figure whose ``engines`` are what that
runtime trains with: fedkit's Python phone runtime (``device_runtime`` under Termux with a
Debian userland) trains with ``ort`` only, since ExecuTorch's Python bindings import torch.
A class assumed to run a native app with ExecuTorch's ``TrainingModule`` would list
``executorch`` there; the planner plans no engine a class does not list.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from toolkit.errors import PlanError
from toolkit.profiling.profile import MEMORY_SHARE, DeviceProfile, Link

LINK_FIELDS = ("downlink_mbps", "uplink_mbps", "rtt_ms", "radio_power_w")


@cache
def load_catalog() -> dict:
    return json.loads(resources.files("toolkit.profiling").joinpath("catalog.json").read_text())


def class_names() -> list[str]:
    return [c["name"] for c in load_catalog()["classes"]]


def links() -> dict[str, Link]:
    """The catalogue's typical links by name (3g, 4g, 5g, wifi)."""
    return {
        name: Link(name=name, **{f: fig[f]["value"] for f in LINK_FIELDS})
        for name, fig in load_catalog()["links"].items()
    }


def link(name: str) -> Link:
    known = links()
    if name not in known:
        raise PlanError(f"unknown link {name!r}: choose one of {', '.join(known)}")
    return known[name]


def derived_figures(entry: dict) -> dict[str, float]:
    """peak_gflops, gflops and memory_mb of one class, recomputed from its published figures."""
    data = load_catalog()
    per_cycle = data["flops_per_cycle"]["value"]
    peak = sum(c["count"] * c["ghz"] * per_cycle[c["core"]] for c in entry["cpu_clusters"]["value"])
    return {
        "peak_gflops": round(peak, 1),
        "gflops": round(peak * data["utilisation"]["value"], 1),
        "memory_mb": round(entry["ram_gb"]["value"] * 1024 * data["available_share"]["value"] * MEMORY_SHARE),
    }


def catalog_profiles(classes: list[str] | None = None, link_name: str | None = None) -> list[DeviceProfile]:
    """Profiles of the named classes (all when None), each on its own cellular link unless
    ``link_name`` puts them all on one."""
    entries = {c["name"]: c for c in load_catalog()["classes"]}
    unknown = [name for name in classes or [] if name not in entries]
    if unknown:
        raise PlanError(f"unknown phone class(es) {', '.join(unknown)}: choose from {', '.join(entries)}")
    profiles = []
    for name in classes or list(entries):
        entry = entries[name]
        profiles.append(
            DeviceProfile(
                name=name,
                source="catalog",
                cpu_cores=sum(c["count"] for c in entry["cpu_clusters"]["value"]),
                gflops=entry["gflops"]["value"],
                memory_mb=entry["memory_mb"]["value"],
                engines=tuple(entry["runtime"]["engines"]),
                link=link(link_name or entry["cellular"]["value"]),
                cpu_power_w=entry["cpu_power_w"]["value"],
                notes=f"{entry['device']} ({entry['soc']['value']}, {entry['year']}); "
                f"runtime {entry['runtime']['value']}",
            )
        )
    return profiles
