"""Which hardware path each piece of work takes: the network's device and precision, the JPEG
decoder, and FAISS.

Every choice is a pure function of what is asked for and of an :class:`Availability` (what this
machine has), so the choices are tested on machines without a GPU by passing the availability in.
:func:`Availability.probe` finds the real one. On a CPU-only machine every choice is the CPU path,
which stays exactly as it was.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only where a network runs: search and placement stay torch-free
    import torch

__all__ = ["Availability", "JPEG_MAX_GPU_PIXELS", "decoder_for", "faiss_on_gpu", "faiss_to_gpu",
           "gpu_decoding"]

#: Larger JPEGs are decoded on the CPU: open_rgb's own pixel limit and its DCT-scaled decoding
#: handle them there, and one huge image must not take the GPU's memory from a whole batch.
JPEG_MAX_GPU_PIXELS = 40_000_000


@dataclass(frozen=True)
class Availability:
    """What this machine offers: CUDA (and bf16 on it), torchvision's GPU JPEG decoder, FAISS GPUs."""

    cuda: bool = False
    cuda_bf16: bool = False
    gpu_jpeg: bool = False
    faiss_gpus: int = 0

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def probe() -> "Availability":
        import torch

        cuda = torch.cuda.is_available()
        return Availability(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                            gpu_jpeg=cuda and _torchvision_gpu_jpeg(), faiss_gpus=_faiss_gpus())


def _torchvision_gpu_jpeg() -> bool:
    """torchvision decodes JPEG lists on CUDA from 0.19 (nvJPEG); older builds have no such path."""
    try:
        import torchvision
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    major, minor = (int(part) for part in torchvision.__version__.split(".")[:2])
    return (major, minor) >= (0, 19)


@functools.lru_cache(maxsize=1)
def _faiss_gpu_count() -> int:
    return _faiss_gpus()


def _faiss_gpus(faiss_module=None) -> int:
    """GPUs FAISS can use: 0 unless the installed faiss has GPU support (the ``gpu`` extra)."""
    try:
        faiss = faiss_module or __import__("faiss")
    except ImportError:
        return 0
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def gpu_decoding(device: torch.device, available: Availability | None = None) -> bool:
    """Whether a run on ``device`` decodes its JPEGs on the GPU (some files may still fall back)."""
    available = available or Availability.probe()
    return device.type == "cuda" and available.cuda and available.gpu_jpeg


def decoder_for(image_format: str | None, mode: str | None, pixels: int, device: torch.device,
                available: Availability | None = None) -> str:
    """``"gpu"`` or ``"cpu"``: where one file, as its header describes it, is decoded.

    The GPU takes baseline and progressive JPEGs in RGB or greyscale up to
    :data:`JPEG_MAX_GPU_PIXELS`; everything else (other formats, CMYK or YCCK JPEGs, which
    nvJPEG does not convert as Pillow does, huge images, an unreadable header) goes the CPU
    way, which records its errors as before.
    """
    if not gpu_decoding(device, available):
        return "cpu"
    if image_format != "JPEG" or mode not in ("RGB", "L") or not 0 < pixels <= JPEG_MAX_GPU_PIXELS:
        return "cpu"
    return "gpu"


def faiss_on_gpu(device: torch.device | None = None, available: Availability | None = None) -> bool:
    """FAISS searches on the GPU when the faiss build has GPU support and sees a GPU, unless the
    run was asked to stay on the CPU (``device`` cpu)."""
    # FAISS's own count of GPUs decides; probing CUDA through torch would load torch for nothing
    gpus = available.faiss_gpus if available is not None else _faiss_gpu_count()
    return gpus > 0 and (device is None or device.type == "cuda")


def faiss_to_gpu(index, device: torch.device | None = None, available: Availability | None = None,
                 faiss_module=None):
    """``index`` copied to GPU 0 (or ``device``'s GPU) where :func:`faiss_on_gpu` says so, else
    ``index`` itself."""
    if not faiss_on_gpu(device, available):
        return index
    faiss = faiss_module or __import__("faiss")
    gpu = device.index if device is not None and device.index is not None else 0
    return faiss.index_cpu_to_gpu(_gpu_resources(faiss), gpu, index)


_RESOURCES: dict = {}


def _gpu_resources(faiss):
    """One ``StandardGpuResources`` per process: each holds scratch memory on the GPU."""
    key = id(faiss)
    if key not in _RESOURCES:
        _RESOURCES[key] = faiss.StandardGpuResources()
    return _RESOURCES[key]
