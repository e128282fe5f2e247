"""Loads the C++/CUDA extension (xverse_engine._C) and picks which kernels a model runs.

kernels = "torch": the pure-PyTorch twins (always available, the readable reference)
          "cpu" / "cuda": torch.ops.xverse.* from the extension, on that device
          "auto": "cuda" on a GPU, "cpu" on the CPU when the extension is built, else "torch"
"""
import importlib

KERNEL_CHOICES = ("auto", "cuda", "cpu", "torch")


def _load():
    try:
        module = importlib.import_module("xverse_engine._C")
        return module, None
    except ImportError as error:  # not built: the twins still work
        return None, error


_EXTENSION, _LOAD_ERROR = _load()


def extension_available() -> bool:
    return _EXTENSION is not None


def extension_built_with_cuda() -> bool:
    return _EXTENSION is not None and bool(getattr(_EXTENSION, "built_with_cuda", False))


def resolve_kernels(kernels: str, device_type: str) -> str:
    """Turns the user's `kernels` setting into "cuda" | "cpu" | "torch" for a device, or raises why not."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} is not one of {KERNEL_CHOICES}")
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        if device_type == "cuda":
            return "cuda" if extension_built_with_cuda() else "torch"
        return "cpu" if extension_available() else "torch"
    if not extension_available():
        raise ValueError(
            f"kernels={kernels!r} needs the compiled extension xverse_engine._C, which failed to import "
            f"({_LOAD_ERROR}). Build it with `pip install --no-build-isolation -e .`, or use kernels='torch'.")
    if kernels != device_type:
        raise ValueError(f"kernels={kernels!r} cannot run on device type {device_type!r}; "
                         f"use kernels='auto' or kernels={device_type!r}")
    if kernels == "cuda" and not extension_built_with_cuda():
        raise ValueError("kernels='cuda' but the extension was built without CUDA (no nvcc / CPU torch at "
                           "build time). Rebuild with a CUDA torch and CUDA_HOME set, or use kernels='torch'.")
    return kernels
