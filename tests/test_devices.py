"""Hardware selection (atlasq.devices) and the GPU decoding path, checked without a GPU.

Which device, decoder and FAISS path is chosen is a pure function of the request and of an
injected :class:`Availability`. The GPU decoding path itself (batch decode, per-file retries,
CPU fallback into ``errors``) runs here on the CPU by pointing ``decode_jpeg`` at the CPU; the
runs that need CUDA are skipped with the reason.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from atlasq import devices, embed
from atlasq.devices import Availability, decoder_for, faiss_on_gpu, faiss_to_gpu, gpu_decoding
from atlasq.embed import decode_file, decode_on_gpu, read_for_gpu
from atlasq.errors import InvalidOptionError
from atlasq.images import FileEntry, content_hash
from atlasq.model import autocast, load_model, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GPU_BOX = Availability(cuda=True, cuda_bf16=True, gpu_jpeg=True, faiss_gpus=1)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def test_decoder_selection_by_format_mode_size_and_hardware():
    assert decoder_for("JPEG", "RGB", 640 * 480, CUDA, GPU_BOX) == "gpu"
    assert decoder_for("JPEG", "L", 640 * 480, CUDA, GPU_BOX) == "gpu"
    # other formats, CMYK JPEGs, huge or empty images: the CPU way
    assert decoder_for("PNG", "RGB", 640 * 480, CUDA, GPU_BOX) == "cpu"
    assert decoder_for("WEBP", "RGB", 640 * 480, CUDA, GPU_BOX) == "cpu"
    assert decoder_for("JPEG", "CMYK", 640 * 480, CUDA, GPU_BOX) == "cpu"
    assert decoder_for("JPEG", "RGB", devices.JPEG_MAX_GPU_PIXELS + 1, CUDA, GPU_BOX) == "cpu"
    assert decoder_for("JPEG", "RGB", 0, CUDA, GPU_BOX) == "cpu"
    # a CPU run, or a machine without CUDA or without torchvision's GPU decoder, never decodes on a GPU
    assert decoder_for("JPEG", "RGB", 640 * 480, CPU, GPU_BOX) == "cpu"
    assert decoder_for("JPEG", "RGB", 640 * 480, CUDA, Availability()) == "cpu"
    assert decoder_for("JPEG", "RGB", 640 * 480, CUDA, Availability(cuda=True)) == "cpu"
    assert gpu_decoding(CUDA, GPU_BOX) and not gpu_decoding(CPU, GPU_BOX)


class FakeFaiss:
    """Records what would be moved to which GPU."""

    def __init__(self, gpus: int):
        self.gpus, self.moved = gpus, []

    def get_num_gpus(self):
        return self.gpus

    def StandardGpuResources(self):  # noqa: N802 (faiss's name)
        return "resources"

    def index_cpu_to_gpu(self, resources, gpu, index):
        self.moved.append((resources, gpu, index))
        return ("gpu", gpu, index)


def test_faiss_goes_to_the_gpu_only_with_gpu_faiss_and_not_for_cpu_runs():
    fake = FakeFaiss(1)
    assert devices._faiss_gpus(fake) == 1
    assert devices._faiss_gpus(SimpleNamespace()) == 0  # faiss-cpu: no GPU symbols
    with_gpu = Availability(cuda=True, faiss_gpus=1)
    assert faiss_to_gpu("index", None, with_gpu, fake) == ("gpu", 0, "index")
    assert faiss_to_gpu("index", torch.device("cuda:1"), with_gpu, fake) == ("gpu", 1, "index")
    assert faiss_to_gpu("index", CPU, with_gpu, fake) == "index"
    assert faiss_to_gpu("index", None, Availability(cuda=True, faiss_gpus=0), fake) == "index"
    assert len(fake.moved) == 2
    assert faiss_on_gpu(None, with_gpu) and not faiss_on_gpu(CPU, with_gpu)


def test_this_machine_without_gpu_faiss_keeps_every_index_on_the_cpu():
    import faiss

    if devices._faiss_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    index = faiss.IndexFlatIP(4)
    assert faiss_to_gpu(index) is index


def test_precision_on_cuda_is_bf16_or_fp16_and_fp16_is_refused_on_a_cpu(monkeypatch):
    monkeypatch.setattr(Availability, "probe", staticmethod(lambda: Availability(cuda=True, cuda_bf16=True)))
    assert resolve_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(Availability, "probe", staticmethod(lambda: Availability(cuda=True, cuda_bf16=False)))
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_precision("fp32", CUDA) == "fp32"
    with pytest.raises(InvalidOptionError, match="fp16 needs --device cuda"):
        resolve_precision("fp16", CPU)
    assert autocast(CUDA, "fp16").fast_dtype == torch.float16
    assert autocast(CUDA, "bf16").fast_dtype == torch.bfloat16


def _jpeg(path, size=(150, 100), seed=0, mode="RGB"):
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, "JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def demo_cpu(demo_weights):
    return load_model("demo", device="cpu")


@pytest.fixture
def mixed_folder(tmp_path):
    """Two good JPEGs, a greyscale JPEG, a PNG, a CMYK JPEG and a truncated JPEG."""
    _jpeg(tmp_path / "a.jpg", seed=1)
    _jpeg(tmp_path / "b.jpg", (200, 160), seed=2)
    _jpeg(tmp_path / "grey.jpg", seed=3, mode="L")
    Image.new("RGB", (90, 70), (10, 200, 30)).save(tmp_path / "c.png")
    _jpeg(tmp_path / "cmyk.jpg", seed=4, mode="CMYK")
    whole = _jpeg(tmp_path / "whole.jpg", seed=5).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 3])
    (tmp_path / "whole.jpg").unlink()
    names = ["a.jpg", "c.png", "cut.jpg", "b.jpg", "cmyk.jpg", "grey.jpg"]
    entries = [FileEntry(name, (tmp_path / name).stat().st_size, 0.0) for name in names]
    return tmp_path, entries


def _as_if_on_gpu(monkeypatch):
    """Let the GPU path run on the CPU: every device "has" a GPU decoder, decode_jpeg decodes on the CPU."""
    real = embed.decoder_for
    monkeypatch.setattr(embed, "decoder_for", lambda f, m, p, device, available=None: real(f, m, p, CUDA, GPU_BOX))


def test_gpu_decoding_path_decodes_jpegs_in_a_batch_and_falls_back_per_file(monkeypatch, mixed_folder, demo_cpu):
    root, entries = mixed_folder
    _as_if_on_gpu(monkeypatch)
    calls = []

    def decode(data, **options):
        calls.append(len(data) if isinstance(data, list) else 1)
        from torchvision.io import decode_jpeg
        return decode_jpeg(data, **{**options, "device": "cpu"})

    read = [read_for_gpu(root, e, demo_cpu) for e in entries]
    # only the RGB and greyscale JPEGs (the cut one's header is whole) wait for the GPU
    assert [d.raw is not None for d in read] == [True, False, True, True, False, True]
    out = decode_on_gpu(root, read, demo_cpu, decode=decode)
    assert calls[0] == 4 and calls[1:] == [1, 1, 1, 1]  # the batch failed on the cut file: one by one
    cpu = [decode_file(root, e, demo_cpu) for e in entries]
    assert [d.entry.path for d in out] == [e.path for e in entries]
    for got, want in zip(out, cpu):
        assert got.error == want.error
        assert got.raw is None
        if want.error is None:
            assert (got.width, got.height) == (want.width, want.height)
            assert got.hash == want.hash == content_hash(root / got.entry.path)
            assert got.tensor.shape == want.tensor.shape
            # torchvision's resize of the decoded tensor vs Pillow's: the same picture
            assert float((got.tensor - want.tensor).abs().mean()) < 0.15, got.entry.path
    assert out[2].error is not None  # the cut JPEG is an error, as on the CPU path


def test_indexer_decodes_batches_on_the_gpu_path_in_order(monkeypatch, mixed_folder, demo_cpu):
    from atlasq import indexer

    root, entries = mixed_folder
    _as_if_on_gpu(monkeypatch)
    seen = []
    real = embed.decode_on_gpu

    def spy(root_, batch, model, decode=None):
        seen.append(sum(d.raw is not None for d in batch))
        return real(root_, batch, model, decode=lambda data, **o: __import__("torchvision").io.decode_jpeg(
            data, **{**o, "device": "cpu"}))

    monkeypatch.setattr(indexer, "decode_on_gpu", spy)
    batches = list(indexer._decoded_batches(root, entries, demo_cpu, 4, 2, gpu=True))
    assert [len(b) for b in batches] == [4, 2] and seen == [3, 1]
    flat = [d for b in batches for d in b]
    assert [d.entry.path for d in flat] == [e.path for e in entries]
    assert [d.error is None for d in flat] == [d.error is None for d in (decode_file(root, e, demo_cpu)
                                                                       for e in entries)]


@NO_CUDA
def test_cuda_index_matches_the_cpu_index(tmp_path, demo_weights):
    from atlasq.indexer import IndexOptions, build_index
    from atlasq.store import IndexStore, index_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        _jpeg(folder / f"p{i}.jpg", (320, 240), seed=i)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    tops = {}
    for device in ("cpu", "cuda"):
        summary = build_index(folder, device, home=tmp_path / "home", device=device, progress=False,
                              options=IndexOptions(model="demo", attributions=True))
        assert summary.total_images == 6 and summary.total_errors == 1
        with IndexStore(index_folder(device, tmp_path / "home"), read_only=True) as store:
            tops[device] = store.pooled(list(range(6)))[1]
    cos = (tops["cpu"] * tops["cuda"]).sum(1) / np.linalg.norm(tops["cpu"], axis=1) / np.linalg.norm(tops["cuda"], axis=1)
    assert cos.min() > 0.98
