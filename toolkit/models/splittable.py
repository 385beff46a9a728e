"""SplittableModel: a model as an ordered list of named blocks that can be cut between any two.

Cut ``c`` puts ``blocks[:c]`` on the phone and ``blocks[c:]`` on the edge; ``c == len(blocks)``
is everything on the phone (federated transfer learning), ``c == 0`` everything on the edge.
The parts keep the whole model's parameter names (``features.17.conv.0.0.weight``), so the
manifest, the codec and the aggregator all speak of the same tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from toolkit.errors import ModelError


@dataclass(frozen=True)
class BlockStats:
    """What one block costs, per sample, at the model's input size."""

    name: str
    flops: int  # forward FLOPs per sample (2 × multiply-adds of conv and linear layers)
    params: int
    out_shape: tuple[int, ...]  # per-sample output shape
    out_bytes: int  # fp32 bytes of the per-sample output activation
    op_types: tuple[str, ...]  # module types inside, e.g. ("Conv2d", "BatchNorm2d", "ReLU6")


class SubModel(nn.Module):
    """Consecutive blocks run in order, registered under their names in the whole model."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        super().__init__()
        self.block_names = [name for name, _ in blocks]
        for name, module in blocks:
            _attach(self, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.block_names:
            x = _lookup(self, name)(x)
        return x


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    # getattr/setattr reach children by name in any nn.Module, ModuleDict and Sequential alike
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            setattr(node, part, nn.ModuleDict())
        node = getattr(node, part)
    setattr(node, leaf, module)


def _lookup(root: nn.Module, dotted: str) -> nn.Module:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


class SplittableModel:
    """A whole model, its ordered blocks, and the parts on either side of any cut."""

    def __init__(
        self,
        model_id: str,
        root: nn.Module,
        block_names: list[str],
        input_shape: tuple[int, int, int],
        num_classes: int,
        layer_ends: tuple[int, ...] = (),
    ):
        self.model_id = model_id
        self.root = root
        self.block_names = list(block_names)
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.head_name = self.block_names[-1]
        # Positions after each of the model's layers, where a layer is several blocks (a searched
        # network's stage pools): early exits default to them (toolkit.models.exits.default_exits).
        self.layer_ends = tuple(layer_ends)

    # -- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(name, _lookup(self.root, name)) for name in self.block_names]

    @property
    def cuts(self) -> list[int]:
        """Allowed cut points: 0 (all on the edge) to len(blocks) (all on the phone)."""
        return list(range(len(self.block_names) + 1))

    def check_cut(self, cut: int) -> None:
        if cut not in self.cuts:
            raise ModelError(f"cut {cut} is not allowed for {self.model_id}: choose one of 0..{len(self.block_names)}")

    def part(self, start: int, stop: int) -> SubModel:
        """Blocks start..stop-1, sharing parameters with the whole model."""
        self.check_cut(start)
        self.check_cut(stop)
        return SubModel(self.blocks[start:stop])

    @property
    def exits(self) -> tuple[int, ...]:
        """Positions of the model's early exits (``toolkit.models.exits``): none for a plain model."""
        return ()

    def frozen_part(self, stop: int) -> nn.Module:
        """What a phone runs once per shard before the part it trains: blocks [0, stop)."""
        return self.part(0, stop)

    def trainable_part(self, start: int, stop: int) -> nn.Module:
        """What a phone trains, on ``frozen_part(start)``'s output: blocks [start, stop)."""
        return self.part(start, stop)

    def device_part(self, cut: int) -> SubModel:
        return self.part(0, cut)

    def edge_part(self, cut: int) -> SubModel:
        return self.part(cut, len(self.block_names))

    def parameterised_blocks(self, stop: int | None = None) -> list[int]:
        """Indices of blocks (before ``stop``) that have parameters."""
        stop = len(self.block_names) if stop is None else stop
        return [i for i, (_, m) in enumerate(self.blocks[:stop]) if any(True for _ in m.parameters())]

    def train_from(self, cut: int, train_blocks: int) -> int:
        """Index of the first trainable block when the last ``train_blocks`` parameterised
        blocks before ``cut`` train (1 = the classifier alone when the cut is at the end)."""
        self.check_cut(cut)
        with_params = self.parameterised_blocks(cut)
        if not 0 <= train_blocks <= len(with_params):
            raise ModelError(
                f"{self.model_id} has {len(with_params)} blocks with parameters before cut {cut}; "
                f"--train-blocks must be between 0 and {len(with_params)}, got {train_blocks}"
            )
        return cut if train_blocks == 0 else with_params[-train_blocks]

    # -- the model -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part(0, len(self.block_names))(x)

    def new_head(self, num_classes: int, seed: int = 0) -> SplittableModel:
        """Replaces the classifier with a fresh Linear(in, num_classes), created right after
        ``torch.manual_seed(seed)`` so runs are reproducible."""
        old = _lookup(self.root, self.head_name)
        linear = old if isinstance(old, nn.Linear) else [m for m in old.modules() if isinstance(m, nn.Linear)][-1]
        torch.manual_seed(seed)
        _attach(self.root, self.head_name, nn.Linear(linear.in_features, num_classes))
        self.num_classes = num_classes
        self.__dict__.pop("stats", None)
        return self

    def content_hash(self) -> str:
        """sha256 over every tensor of the state dict, by name: the model's identity."""
        h = hashlib.sha256(self.model_id.encode())
        for name, tensor in sorted(self.root.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @cached_property
    def stats(self) -> list[BlockStats]:
        """Per-block FLOPs, parameters and output activation size, measured with one forward."""
        stats = []
        was_training = self.root.training
        self.root.eval()
        x = torch.zeros(1, *self.input_shape)
        with torch.no_grad():
            for name, module in self.blocks:
                flops = _count_flops(module, x)
                x = module(x)
                stats.append(
                    BlockStats(
                        name=name,
                        flops=flops,
                        params=sum(p.numel() for p in module.parameters()),
                        out_shape=tuple(x.shape[1:]),
                        out_bytes=int(x[0].numel()) * 4,
                        op_types=tuple(sorted({type(m).__name__ for m in module.modules() if not list(m.children())})),
                    )
                )
        self.root.train(was_training)
        return stats


def _count_flops(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kernel = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * kernel * out.numel()

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += 2 * m.in_features * out.numel()

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    module(x)
    for h in handles:
        h.remove()
    return total
