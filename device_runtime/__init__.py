"""What runs on the phone: bundle loader, training engines, trainer, update codec, sync client.

Torch-free by contract: only numpy, onnxruntime and the standard library (plus httpx for sync).
"""

__version__ = "0.1.0"
