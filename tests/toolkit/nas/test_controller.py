"""The controller learns, on a synthetic reward with no supernet: fast and deterministic."""

from __future__ import annotations

import copy

import pytest
import torch

from toolkit.nas.controller import Controller, Reinforce

POOLS, FAMILIES = 9, 2
BEST = (1, 0, 1, 1, 0, 0, 1, 0, 1)


def synthetic_reward(choice: tuple[int, ...]) -> float:
    """The share of pools where ``choice`` picks BEST's family: one best family per pool."""
    return sum(c == b for c, b in zip(choice, BEST, strict=True)) / POOLS


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    pass


def _train(steps: int, seed: int = 0, samples_per_step: int = 4) -> tuple[Controller, Reinforce, torch.Generator]:
    controller = Controller(POOLS, FAMILIES, hidden=64, seed=seed)
    trainer = Reinforce(controller, lr=0.01, entropy_weight=1e-3, baseline_decay=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        samples = [controller.sample(generator) for _ in range(samples_per_step)]
        trainer.update(samples, [synthetic_reward(s.choice) for s in samples])
    return controller, trainer, generator


def test_a_sample_is_one_family_per_pool_with_its_log_probability_and_entropy():
    controller = Controller(POOLS, FAMILIES, hidden=64, seed=0)
    sample = controller.sample(torch.Generator().manual_seed(0))

    assert len(sample.choice) == POOLS and set(sample.choice) <= {0, 1}
    probs = controller.probabilities(sample.choice)
    expected = sum(torch.log(torch.tensor(p[c])) for p, c in zip(probs, sample.choice, strict=True))
    torch.testing.assert_close(sample.log_prob.detach(), expected, rtol=1e-5, atol=1e-5)
    # near-uniform at the start: each pool's entropy close to log 2
    assert sample.entropy.item() == pytest.approx(POOLS * torch.log(torch.tensor(2.0)).item(), rel=0.05)
    assert sample.log_prob.requires_grad


def test_it_learns_the_best_family_of_every_pool():
    controller, trainer, _ = _train(steps=200)

    probs = controller.probabilities(BEST)
    assert controller.most_likely() == BEST
    assert min(p[b] for p, b in zip(probs, BEST, strict=True)) > 0.9
    assert trainer.baseline is not None and trainer.baseline > 0.85  # the rewards it sees are near the best


def test_same_seed_same_policy_and_a_restored_state_continues_identically():
    a, trainer_a, gen_a = _train(steps=20)
    b, _, _ = _train(steps=20)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)

    # resume: a fresh controller and trainer from the state dict, the generator from its state
    state = copy.deepcopy(trainer_a.state_dict())
    gen_state = gen_a.get_state()
    fresh = Controller(POOLS, FAMILIES, hidden=64, seed=99)
    resumed = Reinforce(fresh, lr=0.01, entropy_weight=1e-3, baseline_decay=0.9)
    resumed.load_state_dict(state)
    gen_b = torch.Generator()
    gen_b.set_state(gen_state)
    for _ in range(5):
        for trainer, gen in ((trainer_a, gen_a), (resumed, gen_b)):
            samples = [trainer.controller.sample(gen) for _ in range(4)]
            trainer.update(samples, [synthetic_reward(s.choice) for s in samples])
    assert resumed.baseline == trainer_a.baseline
    for pa, pb in zip(a.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
