"""A search config small enough for a CLI test: a few images and batches, seconds to run."""

TINY_NAS = """name = "cli-tiny"
[data]
train_images = 48
val_images = 16
test_images = 16
adapter_images = 8
[supernet]
warmup_batches = 1
batch_size = 8
batches_per_network = 1
eval_images = 16
[controller]
steps = 2
samples_per_step = 2
[final]
top_k = 2
"""
