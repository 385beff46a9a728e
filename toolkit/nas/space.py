"""The search space: block pools from pretrained backbones, held by one weight-sharing supernet.

**Pools.** Each family (``FAMILIES``: MobileNetV2 and EfficientNet-Lite0, optionally Lite1) is
cut into the same ``L = 9`` pools: pool 0 the stem (3×3 conv, 3→32, stride 2), pools 1…7 the
seven stages of inverted-residual (MBConv) blocks, pool 8 the head conv (1×1 to 1280). The
families align stage by stage: their stages have the same strides (1, 2, 2, 2, 1, 2, 1), so
pool ``i``'s activation has the same resolution in every family (at 32×32: 16, 16, 8, 4, 2, 2,
1, 1, then the head's 1×1), and the same role; they differ in widths (MobileNetV2's stages end
at 16, 24, 32, 64, 96, 160, 320 channels, Lite's at 16, 24, 40, 80, 112, 192, 320), kernels
(Lite has 5×5 depthwise convs in stages 3, 5, 6) and depth (Lite0: 1, 2, 2, 3, 3, 4, 1 blocks
per stage; MobileNetV2: 1, 2, 3, 4, 3, 3, 1; Lite1: 1, 3, 3, 4, 4, 5, 1). A candidate is one
family's whole pool, so a network is a choice of one family per pool: ``N^L`` networks (2^9 =
512 with two families, 3^9 = 19,683 with three). A choice is a tuple of L family indices.

**Adapters.** Wherever pool ``i`` and pool ``i + 1`` come from different families ``a`` and
``b``, a 1×1 convolution with bias maps ``a``'s pool-``i`` output channels to the channels ``b``'s
pool ``i + 1`` expects (one adapter per boundary and ordered pair of families, shared by every
network that has that change there). ``init_adapters`` initialises them by least squares on
proxy images: at every pixel, ridge regression of ``b``'s own pool-``i`` activation on ``a``'s, so
``b``'s next blocks start from inputs in the distribution their ImageNet weights expect. The ridge
is chosen per adapter on a held-out quarter of the images: Fashion-MNIST's activations are nearly
low-rank, and past stage 5 (1×1 maps at 32×32) there is one row per image, so a fixed small ridge
fits noise (measured, 256 images: λ = 1e-3 leaves stage 7's adapters worse than predicting the
mean, 1.6× its variance; 0.1 leaves 0.55; chosen from RIDGES, the adapters leave 0.38 of b's
variance on average, 0.50 at most). Then they train with the shared weights, like any block on
a sampled network's path, and count in the network's parameters and FLOPs.

**BatchNorm.** Every BatchNorm of the supernet stays in eval mode, also under ``train()``: it
normalises with ImageNet's running statistics, and only its affine parameters train. Batch
statistics would differ with each sampled path and batch, so the shared statistics would drift
towards whichever paths trained last; frozen ones mean the same as on the phones, which run their
frozen blocks in eval mode.

**Networks.** ``network(choice)`` is a standalone ``SplittableModel`` (a copy of the weights):
its blocks are the stem, one block per MBConv block, the adapters (blocks of their own), the
head conv, then ``pool`` and ``classifier``; its parameter names are the supernet's
(``m2.stage3.0.conv.1.0.weight``, ``adapters.3.m2_l0.weight``), so weights copy between the two
by key. Its "layers" are the pools: ``layer_ends`` gives where each pool ends in its blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from toolkit.errors import ModelError
from toolkit.models.backbones import INPUT_SHAPE, backbone
from toolkit.models.splittable import SplittableModel, SubModel, _lookup

FAMILIES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1")
SHORT = {"mobilenet_v2": "m2", "efficientnet_lite0": "l0", "efficientnet_lite1": "l1"}  # in names and arch ids
POOL_NAMES = ["stem", *(f"stage{i}" for i in range(1, 8)), "head"]
HEAD_CHANNELS = 1280
# The least-squares adapters' ridge λ, relative to the mean variance of a's channels: the one of
# these that fits a held-out quarter of the proxy images best (see init_adapters).
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


class Supernet(nn.Module):
    """Every family's pools (``<short>.<pool>``, e.g. ``m2.stage3``), every adapter
    (``adapters.<i>.<a>_<b>``: after pool i, from family a to b), one ``pool`` and one shared
    ``classifier`` (every family's head conv ends at 1280 channels)."""

    def __init__(
        self,
        families: Sequence[str] = ("mobilenet_v2", "efficientnet_lite0"),
        num_classes: int = 10,
        seed: int = 0,
        pretrained: bool = True,
    ):
        super().__init__()
        families = tuple(families)
        if len(families) < 2 or len(set(families)) != len(families) or not set(families) <= set(FAMILIES):
            raise ModelError(f"families {list(families)}: give two or more distinct ones of {', '.join(FAMILIES)}")
        self.families = families
        self.num_pools = len(POOL_NAMES)
        self.pool_names = list(POOL_NAMES)
        self.num_classes = num_classes
        # out_channels[f][i]: family f's pool-i output channels
        self.out_channels: list[list[int]] = []
        for family in families:
            root = backbone(family, pretrained)  # not pretrained: for weights loaded next (a saved network)
            layers = list(root.features.children())
            stages: list[nn.Module] = []
            at = 1
            for n in root.stage_repeats:
                stages.append(nn.Sequential(*layers[at : at + n]))
                at += n
            pools = nn.ModuleDict(dict(zip(POOL_NAMES, [layers[0], *stages, layers[at]], strict=True)))
            self.add_module(SHORT[family], pools)
            self.out_channels.append([_out_channels(pool) for pool in pools.values()])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        torch.manual_seed(seed)  # the zoo's head for the same seed: new_head seeds the same way
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self.adapters = nn.ModuleDict()
        for i in range(self.num_pools - 1):
            pair = nn.ModuleDict()
            for a, fa in enumerate(families):
                for b, fb in enumerate(families):
                    if a != b:
                        pair[f"{SHORT[fa]}_{SHORT[fb]}"] = nn.Conv2d(
                            self.out_channels[a][i], self.out_channels[b][i], 1
                        )
            self.adapters[str(i)] = pair
        self.eval()
        self._costs = self._measure_costs()

    # -- choices ---------------------------------------------------------------------------
    def size(self) -> int:
        return len(self.families) ** self.num_pools

    def check_choice(self, choice: Sequence[int]) -> tuple[int, ...]:
        choice = tuple(int(c) for c in choice)
        if len(choice) != self.num_pools or not all(0 <= c < len(self.families) for c in choice):
            raise ModelError(
                f"choice {list(choice)}: give {self.num_pools} family indices, each 0..{len(self.families) - 1} "
                f"({', '.join(f'{i} = {f}' for i, f in enumerate(self.families))})"
            )
        return choice

    def arch_id(self, choice: Sequence[int]) -> str:
        """The choice as families' short names, e.g. ``m2.m2.l0.l0.m2.l0.m2.l0.m2``."""
        return ".".join(SHORT[self.families[c]] for c in self.check_choice(choice))

    def parse_arch_id(self, arch_id: str) -> tuple[int, ...]:
        """``arch_id``'s inverse."""
        index = {SHORT[f]: i for i, f in enumerate(self.families)}
        parts = arch_id.split(".")
        if len(parts) != self.num_pools or not all(p in index for p in parts):
            raise ModelError(f"architecture {arch_id!r}: write {self.num_pools} of {', '.join(index)} joined by dots")
        return tuple(index[p] for p in parts)

    def block_names(self, choice: Sequence[int]) -> list[str]:
        """The standalone network's blocks: each pool's blocks, an adapter where families change, pool, classifier."""
        choice = self.check_choice(choice)
        names = []
        for i, c in enumerate(choice):
            if i > 0 and choice[i - 1] != c:
                names.append(self._adapter_name(i - 1, choice[i - 1], c))
            prefix = f"{SHORT[self.families[c]]}.{POOL_NAMES[i]}"
            if POOL_NAMES[i].startswith("stage"):  # one block per MBConv
                names += [f"{prefix}.{j}" for j in range(len(list(_lookup(self, prefix).children())))]
            else:
                names.append(prefix)  # the stem or the head conv: one block
        return [*names, "pool", "classifier"]

    def layer_ends(self, choice: Sequence[int]) -> list[int]:
        """Per pool, the position after its last block in ``block_names(choice)`` (exits go there)."""
        names = self.block_names(choice)
        ends = []
        for i, c in enumerate(self.check_choice(choice)):
            prefix = f"{SHORT[self.families[c]]}.{POOL_NAMES[i]}"
            ends.append(max(k for k, name in enumerate(names) if name == prefix or name.startswith(prefix + ".")) + 1)
        return ends

    def _adapter_name(self, i: int, a: int, b: int) -> str:
        return f"adapters.{i}.{SHORT[self.families[a]]}_{SHORT[self.families[b]]}"

    def adapter(self, i: int, a: int, b: int) -> nn.Conv2d:
        """The adapter after pool i from family a to family b."""
        module = _lookup(self, self._adapter_name(i, a, b))
        assert isinstance(module, nn.Conv2d)
        return module

    # -- the model -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Supernet:
        """Trains everything but BatchNorm's statistics (see the module's doc)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor, choice: Sequence[int]) -> torch.Tensor:
        for name in self.block_names(choice):
            x = _lookup(self, name)(x)
        return x

    def path_modules(self, choice: Sequence[int]) -> list[tuple[str, nn.Module]]:
        return [(name, _lookup(self, name)) for name in self.block_names(choice)]

    def path_parameters(self, choice: Sequence[int]) -> list[nn.Parameter]:
        """The parameters the sampled network's forward uses: what training it updates."""
        return [p for _, module in self.path_modules(choice) for p in module.parameters()]

    def params(self, choice: Sequence[int]) -> int:
        """The standalone network's parameter count (adapters and classifier included)."""
        return sum(self._costs[name][1] for name in self.block_names(choice))

    def flops(self, choice: Sequence[int]) -> int:
        """Forward FLOPs per image at 32×32 (as ``SplittableModel.stats`` counts them)."""
        return sum(self._costs[name][0] for name in self.block_names(choice))

    def describe(self, choice: Sequence[int]) -> list[str]:
        """The network as a block list: one line per pool, one per adapter."""
        choice = self.check_choice(choice)
        lines = []
        for i, c in enumerate(choice):
            family = self.families[c]
            if i > 0 and choice[i - 1] != c:
                a = choice[i - 1]
                lines.append(
                    f"  adapter 1×1 conv {self.out_channels[a][i - 1]}→{self.out_channels[c][i - 1]} "
                    f"({self.families[a]} → {family})"
                )
            lines.append(
                f"{POOL_NAMES[i]:<7} {family:<18} {_describe_pool(_lookup(self, f'{SHORT[family]}.{POOL_NAMES[i]}'))}"
            )
        lines.append(f"classifier 1280→{self.num_classes}")
        return lines

    def network(self, choice: Sequence[int]) -> SplittableModel:
        """A standalone copy of the sampled network, in eval mode; model id ``nas:<arch id>``
        until it is saved under a name (``toolkit.models.saved``). Its ``layer_ends`` are its
        stage pools' ends: where ``+exits`` puts its exits by default."""
        choice = self.check_choice(choice)
        root = SubModel([(name, copy.deepcopy(module)) for name, module in self.path_modules(choice)])
        root.eval()
        stage_ends = tuple(self.layer_ends(choice)[1:-1])  # default exits: not after the stem or the head conv
        return SplittableModel(
            f"nas:{self.arch_id(choice)}", root, root.block_names, INPUT_SHAPE, self.num_classes, layer_ends=stage_ends
        )

    # -- least squares ---------------------------------------------------------------------
    @torch.no_grad()
    def pool_outputs(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """[family][pool] activations of each family's own backbone on ``images``."""
        outs = []
        for family in self.families:
            pools = getattr(self, SHORT[family])
            h, acts = images, []
            for name in POOL_NAMES:
                h = pools[name](h)
                acts.append(h)
            outs.append(acts)
        return outs

    @torch.no_grad()
    def init_adapters(self, images: torch.Tensor) -> None:
        """Sets every adapter by ridge regression, per pixel, of family b's own activation after
        pool i on family a's (``images``: (B, 3, 32, 32) normalised as ``toolkit.data.transform``
        does, B ≥ 4; a few hundred are plenty): λ from ``RIDGES`` by the error on the last quarter
        of the images, then refitted on all of them."""
        if len(images) < 4:
            raise ModelError(f"init_adapters needs at least 4 proxy images, got {len(images)}")
        was_training = self.training
        self.eval()
        acts = self.pool_outputs(images)
        fit = len(images) - len(images) // 4
        for i in range(self.num_pools - 1):
            for a in range(len(self.families)):
                x = _pixels(acts[a][i])
                for b in range(len(self.families)):
                    if a != b:
                        y = _pixels(acts[b][i])
                        rows = fit * len(x) // len(images)  # _pixels keeps images in order
                        lam = min(RIDGES, key=lambda lam: _error(ridge(x[:rows], y[:rows], lam), x[rows:], y[rows:]))
                        weight, bias = ridge(x, y, lam)
                        adapter = self.adapter(i, a, b)
                        adapter.weight.copy_(weight[:, :, None, None])
                        assert adapter.bias is not None
                        adapter.bias.copy_(bias)
        self.train(was_training)

    def _measure_costs(self) -> dict[str, tuple[int, int]]:
        """(FLOPs, parameters) of every block a network can have, measured once."""
        costs: dict[str, tuple[int, int]] = {}
        for c in range(len(self.families)):
            whole = (c,) * self.num_pools
            names = self.block_names(whole)
            model = SplittableModel("cost", SubModel(self.path_modules(whole)), names, INPUT_SHAPE, self.num_classes)
            costs |= {s.name: (s.flops, s.params) for s in model.stats}
            shapes = {s.name: s.out_shape for s in model.stats}
            for i in range(self.num_pools - 1):
                for b in range(len(self.families)):
                    if b != c:
                        name = self._adapter_name(i, c, b)
                        channels, height, width = shapes[names[self.layer_ends(whole)[i] - 1]]
                        part = SplittableModel(
                            name, SubModel([(name, _lookup(self, name))]), [name], (channels, height, width), 0
                        )
                        costs[name] = (part.stats[0].flops, part.stats[0].params)
        self.eval()  # stats restored the modules' modes: BatchNorm back to eval
        return costs


def ridge(x: torch.Tensor, y: torch.Tensor, relative: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias (out,)) minimising mean |x Wᵀ + b - y|² + λ|W|² (rows are
    samples), λ = ``relative`` × the mean variance of x's columns, so it scales with the activations."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = (x - mean_x).double(), (y - mean_y).double()
    gram = xc.T @ xc / len(x)
    lam = relative * gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc / len(x)).T.float()
    return weight, mean_y - weight @ mean_x


def _error(fitted: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    weight, bias = fitted
    return float(((x @ weight.T + bias - y) ** 2).mean())


def baseline_params(num_classes: int = 10) -> int:
    """MobileNetV2's parameter count with a ``num_classes`` head: the reward's P."""
    root = backbone("mobilenet_v2", pretrained=False)
    features = sum(p.numel() for p in root.features.parameters())
    return features + HEAD_CHANNELS * num_classes + num_classes


def _pixels(act: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B·H·W, C): one row per pixel."""
    return act.permute(0, 2, 3, 1).reshape(-1, act.shape[1])


def _out_channels(pool: nn.Module) -> int:
    convs = [m for m in pool.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _describe_pool(pool: nn.Module) -> str:
    convs = [m for m in pool.modules() if isinstance(m, nn.Conv2d)]
    if not any(c.groups > 1 for c in convs):  # the stem or the head conv
        conv = convs[0]
        k, s = conv.kernel_size[0], conv.stride[0]
        return f"conv {k}×{k} {conv.in_channels}→{conv.out_channels}" + (f" stride {s}" if s > 1 else "")
    blocks = list(pool.children())
    depthwise = next(m for m in blocks[0].modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    expand = depthwise.in_channels // convs[0].in_channels
    k, s = depthwise.kernel_size[0], depthwise.stride[0]
    cin, cout = convs[0].in_channels, convs[-1].out_channels
    return f"{len(blocks)}× MBConv k{k} e{expand} {cin}→{cout}" + (f" stride {s}" if s > 1 else "")
