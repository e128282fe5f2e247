"""torch.ops.xverse_emu.*: the CUDA kernels of csrc/ run on CPU tensors by the SIMT emulator (csrc/emu/).

Each op has the schema of torch.ops.xverse.<op> (copied from there, so torch_bindings.cpp stays the one
contract) and runs that op's CUDA launcher: the same checks, grids and shared-memory arithmetic, with every
kernel launch executed on the CPU, one OS thread per CUDA thread. For tests: it is slow, and it says nothing
about speed.

    from xverse_engine.ops import emulated
    ops = emulated.load()            # raises EmulatorUnavailable (with the reason) if it cannot
    out = ops.paged_attention_decode(q, k_cache, v_cache, tables, lens, scale)
"""
import importlib
import importlib.util
import os
import subprocess
import sys

import torch

from . import emulated_build

NAMESPACE = "xverse_emu"


class EmulatorUnavailable(RuntimeError):
    """The emulated extension is not built (or cannot be), with the reason and the fix."""


def _define_schemas():
    """Registers every torch.ops.xverse schema again under xverse_emu (once per process)."""
    if hasattr(_define_schemas, "library"):
        return
    importlib.import_module("xverse_engine._C")  # the contract: TORCH_LIBRARY(xverse, ...)
    library = torch.library.Library(NAMESPACE, "DEF")
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("xverse::"):
            library.define(str(schema)[len("xverse::"):])
    _define_schemas.library = library  # kept alive: dropping it would unregister the schemas


def requested_sanitizer():
    """"address" / "thread" when this process runs the sanitized emulator (scripts/emu_sanitize.sh sets
    XVERSE_EMU_SANITIZER; XVERSE_EMU_TSAN=1 means "thread"), else None."""
    if os.environ.get("XVERSE_EMU_TSAN") == "1":
        return "thread"
    return os.environ.get("XVERSE_EMU_SANITIZER") or None


def _emulator_module():
    sanitizer = requested_sanitizer()
    if sanitizer is None:
        return importlib.import_module("xverse_engine._emu")
    tag = emulated_build.SANITIZERS.get(sanitizer)
    if tag is None:
        raise EmulatorUnavailable(f"XVERSE_EMU_SANITIZER={sanitizer!r}: use 'address' or 'thread'")
    name = f"xverse_emu_{tag}"
    if name in sys.modules:
        return sys.modules[name]
    preloaded = os.environ.get("LD_PRELOAD", "")
    if f"lib{tag}" not in preloaded:
        raise EmulatorUnavailable(f"the {sanitizer} sanitizer build must run with its runtime preloaded: use "
                                  f"`scripts/emu_sanitize.sh {sanitizer} [pytest args]`")
    path = build_sanitized(sanitizer)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load():
    """The emulator module (xverse_engine._emu, built by setup.py; or its sanitized build, see
    requested_sanitizer()), with its ops registered; returns torch.ops.xverse_emu."""
    try:
        _define_schemas()
    except ImportError as error:
        raise EmulatorUnavailable(f"xverse_engine._C is not built ({error}): `pip install --no-build-isolation -e .`")
    try:
        _emulator_module()
    except ImportError as error:
        reason = ("no cuda_bf16.h on this machine (install the CUDA toolkit or the nvidia-cuda-runtime wheel)"
                  if emulated_build.cuda_include_dir() is None else
                  "rebuild with `pip install --no-build-isolation -e .` (XVERSE_NO_EMU must not be 1)")
        raise EmulatorUnavailable(f"the CPU emulator xverse_engine._emu is not built ({error}): {reason}")
    return getattr(torch.ops, NAMESPACE)


def selftests():
    """The emulator's self-test kernels (csrc/emu/selftest_kernels.cpp)."""
    load()
    return _emulator_module()


def ops_without_emulation():
    """Names of torch.ops.xverse ops that have a CUDA kernel but no emulated implementation."""
    load()
    missing = []
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith("xverse::"):
            continue
        name = schema.name[len("xverse::"):]
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(schema.name, "CUDA")
        has_cuda_source = has_cuda or _declared_as_cuda(name)
        if has_cuda_source and not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU"):
            missing.append(name)
    return missing


def _declared_as_cuda(name):
    """Whether csrc/ops.h declares <name>_cuda (true for every op with a CUDA launcher, even when this
    machine's _C was built without CUDA)."""
    ops_h = os.path.join(emulated_build.REPO, "csrc", "ops.h")
    return os.path.exists(ops_h) and f" {name}_cuda(" in open(ops_h).read()


def build_sanitized(sanitizer, verbose=False):
    """Builds (cached under build/emu_<asan|tsan>) and returns the path of the emulated extension compiled
    with -fsanitize=<address|thread>. It must be loaded in a process started with the sanitizer runtime
    preloaded: see run_sanitized()."""
    from torch.utils import cpp_extension
    if sanitizer not in emulated_build.SANITIZERS:
        raise ValueError(f"sanitizer must be one of {sorted(emulated_build.SANITIZERS)}, got {sanitizer!r}")
    tag = emulated_build.SANITIZERS[sanitizer]
    build_dir = os.path.join(emulated_build.REPO, "build", f"emu_{tag}")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name=f"xverse_emu_{tag}", sources=emulated_build.sources(build_dir),
        extra_cflags=emulated_build.cxx_flags(sanitizer), extra_ldflags=emulated_build.link_flags(sanitizer),
        extra_include_paths=emulated_build.include_dirs(build_dir), build_directory=build_dir, verbose=verbose,
        is_python_module=False)
    return os.path.join(build_dir, f"xverse_emu_{tag}.so")


def sanitizer_runtime(sanitizer):
    """The LD_PRELOAD value for a sanitized run: the compiler's libasan / libtsan, then libstdc++ (python does
    not link it, and without it the sanitizer cannot intercept C++ exceptions: "real___cxa_throw != 0")."""
    paths = []
    for lib in ({"address": "libasan.so", "thread": "libtsan.so"}[sanitizer], "libstdc++.so"):
        path = subprocess.run(["c++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):
            raise EmulatorUnavailable(f"the compiler has no {lib} (install the gcc sanitizer runtime)")
        paths.append(path)
    return " ".join(paths)
