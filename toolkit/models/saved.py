"""Searched networks saved by name, loaded as ``nas:NAME`` (``load_model``).

A saved network is a folder ``<models dir>/<NAME>/`` (models dir: ``$FEDKIT_MODELS_DIR``, else
``~/.local/share/fedkit/models``) holding

- ``weights.pt``: the network's state dict (``torch.save``), its parameter names the supernet's;
- ``architecture.json``: ``SavedArchitecture`` below — the families and the choice that rebuild
  the network from ``toolkit.nas.space.Supernet`` (no pretrained weights needed), its arch id and
  block list, parameters and FLOPs, the classes of its head, and the sha256 of ``weights.pt``.

The weights are written first and the json last, each through a temporary file, so a folder
with an ``architecture.json`` always has the weights it names; a weights file whose sha256 is not
the recorded one is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from device_runtime.bundle import sha256_file
from toolkit.errors import ModelError, describe
from toolkit.models.splittable import SplittableModel

if TYPE_CHECKING:
    from toolkit.nas.space import Supernet

MODELS_DIR_ENV = "FEDKIT_MODELS_DIR"
PREFIX = "nas:"  # model ids of saved networks: nas:NAME
ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "weights.pt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class SavedArchitecture(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    families: list[str]  # the supernet's families, in order: choice indexes them
    choice: list[int]  # one family index per pool
    arch_id: str  # e.g. m2.m2.l0.l0.m2.l0.m2.l0.m2
    blocks: list[str]  # the network's blocks, in order
    description: list[str]  # Supernet.describe: one line per pool and adapter
    params: int
    flops: int  # forward FLOPs per image at 32×32
    num_classes: int
    weights_sha256: str
    extra: dict[str, Any] = {}  # what the saver adds (e.g. the search's reward and accuracy)


def models_dir() -> Path:
    """$FEDKIT_MODELS_DIR, else ~/.local/share/fedkit/models."""
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".local" / "share" / "fedkit" / "models")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ModelError(
            f"network name {name!r}: use letters, digits, '-' and '_' (up to 64, starting with a letter or digit)"
        )
    return name


def save_network(
    supernet: Supernet,
    choice: Sequence[int],
    name: str,
    *,
    directory: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Saves ``supernet.network(choice)`` (its current weights) as ``name``; returns the folder.
    An existing network of that name is replaced."""
    folder = (directory or models_dir()) / check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    choice = supernet.check_choice(choice)
    network = supernet.network(choice)
    weights = folder / WEIGHTS_FILE
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    torch.save(network.root.state_dict(), tmp)
    os.replace(tmp, weights)
    architecture = SavedArchitecture(
        name=name,
        families=list(supernet.families),
        choice=list(choice),
        arch_id=supernet.arch_id(choice),
        blocks=network.block_names,
        description=supernet.describe(choice),
        params=supernet.params(choice),
        flops=supernet.flops(choice),
        num_classes=supernet.num_classes,
        weights_sha256=sha256_file(weights),
        extra=extra or {},
    )
    tmp = folder / (ARCHITECTURE_FILE + ".tmp")
    tmp.write_text(architecture.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / ARCHITECTURE_FILE)
    return folder


def read_architecture(name: str, directory: Path | None = None) -> SavedArchitecture:
    folder = (directory or models_dir()) / check_name(name)
    path = folder / ARCHITECTURE_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in folder.parent.glob(f"*/{ARCHITECTURE_FILE}"))
        raise ModelError(
            f"no saved network {name!r} in {folder.parent} ({MODELS_DIR_ENV} sets that folder): "
            + (f"saved there: {', '.join(known)}; " if known else "")
            + "run `fedkit search --config NAS.toml` to search and save one"
        )
    try:
        return SavedArchitecture.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ModelError(f"{path} is not a saved network's description ({describe(exc)}): search again") from exc


def load_saved(name: str, directory: Path | None = None) -> SplittableModel:
    """The saved network ``name`` with its saved weights (head included), in eval mode; model id ``nas:NAME``."""
    from toolkit.nas.space import Supernet  # toolkit.nas.space builds on this package

    architecture = read_architecture(name, directory)
    folder = (directory or models_dir()) / name
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{weights} is missing: search again, or copy the whole folder {folder}")
    actual = sha256_file(weights)
    if actual != architecture.weights_sha256:
        raise ModelError(
            f"{weights} has sha256 {actual[:12]}…, {ARCHITECTURE_FILE} records {architecture.weights_sha256[:12]}…: "
            "the weights are corrupt or not this network's; copy the whole folder again from where it was saved, "
            "or search again"
        )
    try:
        supernet = Supernet(architecture.families, architecture.num_classes, pretrained=False)
        network = supernet.network(architecture.choice)
        network.root.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    except (RuntimeError, ModelError) as exc:
        raise ModelError(f"{folder} does not load as the network it describes ({exc}): search again") from exc
    if network.block_names != architecture.blocks:
        raise ModelError(f"{folder}: its blocks differ from the network its choice builds today: search again")
    network.model_id = f"{PREFIX}{name}"
    network.root.eval()
    return network
