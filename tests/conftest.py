"""Shared fixtures: small random checkpoints in the real layout, and engines over them."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers: checkpoints, reference

from checkpoints import load_config, load_state_dict, make_checkpoint, make_preset_checkpoint  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# Devices an op test runs on: the CPU always, CUDA where a GPU exists (marked gpu).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")]),
]


def require_extension():
    """Op tests need the compiled extension: fail loudly rather than skip (CI builds it first)."""
    from xverse_engine.ops import extension_available
    if not extension_available():
        pytest.fail("xverse_engine._C is not built: build it with `pip install --no-build-isolation -e .` "
                    "(CI builds it before the tests)", pytrace=False)


def kernel_choices():
    """Every kernel backend that runs here: the twins always; the C++ CPU kernels, which CI builds."""
    return ["torch", "cpu"]


@pytest.fixture(scope="session")
def emu():
    """The CPU SIMT emulator of our CUDA kernels (torch.ops.xverse_emu.*). Skipped only where no CUDA headers
    exist to build it with; where they exist (here, CI) a missing or broken build fails the test."""
    from xverse_engine.ops import emulated
    try:
        return emulated.load()
    except emulated.EmulatorUnavailable as error:
        if emulated.emulated_build.cuda_include_dir() is None:
            pytest.skip(str(error))
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory):
    """The default small MoE: 2 layers, 8 experts top-2, 2 shared, 2 safetensors shards, tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("moe"), max_position_embeddings=512, rope_theta=10000)


@pytest.fixture(scope="session")
def real_head_ckpt(tmp_path_factory):
    """head_dim 80 and top-6 as the real model."""
    return make_preset_checkpoint(tmp_path_factory.mktemp("real_head"), "real-head", max_position_embeddings=512)


@pytest.fixture(scope="session")
def reference_data():
    """(state_dict, config) of a checkpoint, cached per path."""
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = (load_state_dict(path), load_config(path))
        return cache[path]
    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
