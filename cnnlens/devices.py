"""Which torch device a stage runs on, and how the metrics name it."""

from __future__ import annotations

from cnnlens.errors import ParamsError

# the params' device choices (config reads this tuple): auto picks CUDA, then MPS, then the CPU
DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(name: str):
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device = cuda but torch sees no CUDA GPU; use device: auto or cpu")
    if name == "mps" and not _mps_available():
        raise ParamsError("device = mps but MPS is not available; use device: auto or cpu")
    return torch.device(name)


def device_name(device) -> str:
    """What the metrics record as the device: the GPU's name, or the CPU and its thread count."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
