"""The LSTM controller that samples networks, trained by policy gradient (REINFORCE).

One LSTM step per pool: the cell's output goes through that pool's own linear decoder to one
logit per family, a family is sampled from their softmax, and its embedding is the next step's
input (a learnt start vector is the first's). A network's log-probability and entropy are the
sums over its pools.

``Reinforce`` trains it: for each sampled network, advantage = reward − b, with b an exponential
moving average of the rewards seen (decay 0.9: the baseline follows the rewards as the shared
weights improve), and loss = −Σ advantage · log π(choice) − entropy_weight · Σ entropy, averaged
over the step's samples; Adam. The entropy bonus keeps the policy from collapsing onto the first
networks whose shared weights happen to train fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Sample:
    choice: tuple[int, ...]  # one family index per pool
    log_prob: torch.Tensor  # scalar, with the graph back to the controller's parameters
    entropy: torch.Tensor  # scalar: the policy's entropy summed over the pools (nats)


class Controller(nn.Module):
    def __init__(self, num_pools: int, num_choices: int, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # the initial policy is part of the search's seed
        self.num_pools = num_pools
        self.num_choices = num_choices
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.cell = nn.LSTMCell(hidden, hidden)
        self.embedding = nn.Embedding(num_choices, hidden)
        self.decoders = nn.ModuleList(nn.Linear(hidden, num_choices) for _ in range(num_pools))

    def sample(self, generator: torch.Generator) -> Sample:
        """One network, drawn with ``generator`` (the search's, so sampling is reproducible)."""
        x, state = self.start, None
        choice, log_probs, entropies = [], [], []
        for decoder in self.decoders:
            h, c = self.cell(x, state)
            state = (h, c)
            log_p = torch.log_softmax(decoder(h)[0], dim=-1)
            k = int(torch.multinomial(log_p.detach().exp(), 1, generator=generator))
            choice.append(k)
            log_probs.append(log_p[k])
            entropies.append(-(log_p.exp() * log_p).sum())
            x = self.embedding(torch.tensor([k]))
        return Sample(tuple(choice), torch.stack(log_probs).sum(), torch.stack(entropies).sum())

    @torch.no_grad()
    def probabilities(self, choice: tuple[int, ...]) -> list[list[float]]:
        """Per pool, the policy's probability of each family, following ``choice``'s path."""
        x, state, out = self.start, None, []
        for decoder, k in zip(self.decoders, choice, strict=True):
            h, c = self.cell(x, state)
            state = (h, c)
            out.append(torch.softmax(decoder(h)[0], dim=-1).tolist())
            x = self.embedding(torch.tensor([k]))
        return out

    @torch.no_grad()
    def most_likely(self) -> tuple[int, ...]:
        """The greedy choice: the likeliest family at each pool, given the ones before."""
        x, state, choice = self.start, None, []
        for decoder in self.decoders:
            h, c = self.cell(x, state)
            state = (h, c)
            k = int(decoder(h)[0].argmax())
            choice.append(k)
            x = self.embedding(torch.tensor([k]))
        return tuple(choice)


class Reinforce:
    """REINFORCE with a moving-average baseline and an entropy bonus; Adam."""

    def __init__(
        self, controller: Controller, lr: float = 3e-3, entropy_weight: float = 1e-3, baseline_decay: float = 0.9
    ):
        self.controller = controller
        self.entropy_weight = entropy_weight
        self.baseline_decay = baseline_decay
        self.baseline: float | None = None  # None until the first rewards
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=lr)

    def update(self, samples: list[Sample], rewards: list[float]) -> float:
        """One policy-gradient step on a step's samples and their rewards; returns the loss.
        The advantages use the baseline from before this step's rewards, then it moves."""
        if self.baseline is None:
            self.baseline = sum(rewards) / len(rewards)
        advantages = [r - self.baseline for r in rewards]
        loss = torch.stack(
            [-a * s.log_prob - self.entropy_weight * s.entropy for s, a in zip(samples, advantages, strict=True)]
        ).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        for r in rewards:
            self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * r
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
