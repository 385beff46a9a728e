"""The optimizer step on the phone, in numpy, shared by both engines.

``SGD`` follows ``torch.optim.SGD`` (dampening 0, no Nesterov) step for step, so a phone
trains as the host's PyTorch would:

    g = grad + weight_decay * w
    buf = g                        on the first step of a tensor
    buf = momentum * buf + g       afterwards
    w = w - lr * buf
"""

from __future__ import annotations

import numpy as np

from device_runtime.errors import CheckpointError, EngineError


class SGD:
    """Stochastic gradient descent with momentum. ``lr`` may be changed between steps (the
    stage schedule sets it per round); the momentum buffers survive that, and ``reset()``
    drops them (e.g. when new global weights arrive)."""

    def __init__(self, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise EngineError(
                f"SGD needs lr > 0, momentum >= 0 and weight_decay >= 0, got lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}"
            )
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._buffers: dict[str, np.ndarray] = {}

    def step(self, weights: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights after one step; ``weights`` and ``grads`` are left as they were."""
        if set(grads) != set(weights):
            missing, extra = sorted(set(weights) - set(grads)), sorted(set(grads) - set(weights))
            raise EngineError(f"SGD step needs one gradient per weight: missing {missing[:5]}, unknown {extra[:5]}")
        new = {}
        for name, w in weights.items():
            g: np.ndarray = np.asarray(grads[name], dtype=np.float32)  # g + decay * w takes w's dtype
            if g.shape != np.shape(w):
                raise EngineError(f"gradient of {name!r} has shape {g.shape}, the weight has {np.shape(w)}")
            if self.weight_decay:
                g = g + np.float32(self.weight_decay) * w
            if self.momentum:
                buf = self._buffers.get(name)
                buf = g.copy() if buf is None else np.float32(self.momentum) * buf + g
                self._buffers[name] = buf
                g = buf
            new[name] = (w - np.float32(self.lr) * g).astype(np.float32, copy=False)
        return new

    def reset(self) -> None:
        """Forgets the momentum: the next step starts as the first did."""
        self._buffers = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The momentum buffers by weight name (copies), for the trainer's checkpoint."""
        return {name: buf.copy() for name, buf in self._buffers.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restores buffers saved by ``state_dict``."""
        try:
            self._buffers = {str(name): np.array(buf, dtype=np.float32) for name, buf in state.items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"the saved SGD state is not a mapping of name to array ({exc}); delete the local checkpoint"
            ) from exc
