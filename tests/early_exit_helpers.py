"""A model with exits trained for a few seconds on Fashion-MNIST, for the early-exit tests: trained,
so its exits' confidences spread and thresholds split the images between exits (a fresh model's
max softmax sits near 1/10 at every exit), and its weights differ from the zoo's, so a test sees
that the trained ones are exported."""

from __future__ import annotations

import numpy as np

from device_runtime.preprocess import InputSpec, prepare

MODEL_ID = "small_cnn+exits:1,2"  # exits after features.0 and features.1, and the final one at 5


def trained_exit_model(images: np.ndarray, labels: np.ndarray, model_id: str = MODEL_ID, epochs: int = 1):
    """``model_id`` with every exit trained on the images (the multi-exit loss, every weight 1)."""
    import torch

    from toolkit.models import load_model

    model = load_model(model_id)
    part = model.exit_part(0, len(model.block_names))
    x = torch.from_numpy(prepare(images, InputSpec()))
    y = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.Adam(part.parameters(), lr=0.01)
    torch.manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            logits = part(x[batch])
            loss = sum(torch.nn.functional.cross_entropy(logits[:, k], y[batch]) for k in range(logits.shape[1]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def torch_logits(model, images: np.ndarray) -> np.ndarray:
    """Every exit's logits for ``images`` (uint8), (N, exits, classes), from the torch model."""
    import torch

    x = torch.from_numpy(prepare(images, InputSpec()))
    with torch.no_grad():
        return model.exit_part(0, len(model.block_names)).eval()(x).numpy()


def between(values: np.ndarray, quantile: float) -> float:
    """A threshold at ``quantile`` of ``values`` that lies halfway between two of them, so that
    float rounding (ONNX Runtime's against torch's) cannot move a value across it."""
    ordered = np.unique(values)
    i = min(max(int(quantile * len(ordered)), 1), len(ordered) - 1)
    return float((ordered[i - 1] + ordered[i]) / 2)


def predict_argv(folder, images, threshold: float) -> list[str]:
    """``python -m device_runtime predict``'s arguments, after the interpreter."""
    return [
        *("-m", "device_runtime", "predict"),
        *("--early-exit", str(folder)),
        *("--images", str(images)),
        *("--threshold", repr(threshold)),
    ]
