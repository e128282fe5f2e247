"""Builds xverse_engine and its extension xverse_engine._C.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and nvcc is found
(CUDA_HOME); set XVERSE_NO_CUDA=1 to skip them, XVERSE_CUDA_ARCH to change the target (default 90a),
XVERSE_PTXAS_VERBOSE=1 to print the register / shared-memory report of every kernel.
The CPU SIMT emulator's extension (xverse_engine._emu, every .cu compiled as C++) is built too; XVERSE_NO_EMU=1
skips it.
Install without build isolation so the extension is built against the torch you run:
    pip install --no-build-isolation -e .
"""
import glob
import os
import shutil
import site
import sysconfig

from setuptools import find_packages, setup

import torch


def find_cuda_home():
    """CUDA_HOME if set; else the toolkit behind `nvcc` on PATH (following a wrapper script that execs the real
    one), else /usr/local/cuda. Must run before torch.utils.cpp_extension is imported, which reads it once."""
    if os.environ.get("CUDA_HOME"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, errors="ignore") as f:
                head = f.read(4096)
            candidates += [os.path.dirname(os.path.dirname(w)) for w in head.split() if w.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.isfile(
                os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


find_cuda_home()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_wheel_includes():
    """Headers shipped by the nvidia-* wheels (cuBLAS etc.), needed when the toolkit lacks them."""
    roots = site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(root, "nvidia", "cublas", "include"))
    return sorted(set(found))


def build_cuda():
    if os.environ.get("XVERSE_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


if torch.version.cuda and not build_cuda() and os.environ.get("XVERSE_NO_CUDA") != "1":
    print("xverse_engine: no CUDA toolkit found (set CUDA_HOME); building the CPU kernels only")
def cxx_standard():
    """C++20 when the installed torch's headers demand it (torch >= 2.13), else C++17 (older torch)."""
    from torch.utils.cpp_extension import include_paths
    aten = os.path.join(include_paths()[0], "ATen", "ATen.h")
    with open(aten) as f:
        return "c++20" if "202002L" in f.read() else "c++17"


STD = cxx_standard()
cpu_sources = ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/**/*_cpu.cpp", recursive=True))
cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
cxx_flags = ["-O3", f"-std={STD}"]

if build_cuda():
    arch = os.environ.get("XVERSE_CUDA_ARCH", "90a")
    nvcc_flags = [
        "-O3", f"-std={STD}", "-lineinfo", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    if os.environ.get("XVERSE_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    extension = CUDAExtension(
        "xverse_engine._C",
        sources=cpu_sources + cuda_sources,
        include_dirs=[os.path.abspath("csrc")] + cuda_wheel_includes(),
        extra_compile_args={"cxx": cxx_flags + ["-DXVERSE_WITH_CUDA=1"], "nvcc": nvcc_flags},
    )
else:
    extension = CppExtension(
        "xverse_engine._C",
        sources=cpu_sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )


def emulated_extension():
    """xverse_engine._emu: the same .cu sources compiled as C++ for the CPU SIMT emulator (csrc/emu/), used by
    `pytest -m emu`. Skipped with XVERSE_NO_EMU=1, or (with a message) when no cuda_bf16.h is found."""
    if os.environ.get("XVERSE_NO_EMU") == "1":
        return []
    import importlib.util
    spec = importlib.util.spec_from_file_location("emulated_build", os.path.join("xverse_engine", "ops",
                                                                                 "emulated_build.py"))
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    if emu.cuda_include_dir() is None:
        print("xverse_engine: no cuda_bf16.h found (CUDA toolkit or nvidia wheels): not building the CPU emulator")
        return []
    build_dir = os.path.abspath(os.path.join("build", "emu_sources"))
    return [CppExtension(
        "xverse_engine._emu",
        sources=[os.path.relpath(s) for s in emu.sources(build_dir)],
        include_dirs=emu.include_dirs(build_dir),
        extra_compile_args={"cxx": emu.cxx_flags()},
        extra_link_args=emu.link_flags(),
    )]


# uvloop and httptools: uvicorn picks them up by itself; a streamed token costs the HTTP side far less CPU (and
# the engine thread, which shares the GIL with it, less waiting) than with asyncio's own loop and h11
SERVE_REQUIRES = ["fastapi>=0.100", "uvicorn>=0.23", "pydantic>=2", "prometheus-client>=0.17",
                  "uvloop>=0.17; sys_platform != 'win32'", "httptools>=0.5"]

setup(
    name="xverse_engine",
    version="0.1.0",
    description="A fast, readable inference engine for the XVERSE mixture-of-experts LLMs",
    packages=find_packages(include=["xverse_engine", "xverse_engine.*"]),
    package_data={"xverse_engine": ["assets/*/*", "assets/*.json", "server/static/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "tokenizers>=0.15", "safetensors>=0.4", "tqdm", "numpy"],
    extras_require={"test": ["pytest>=7", "sentencepiece", *SERVE_REQUIRES, "openai>=1", "selenium>=4",
                             # cuobjdump / nvdisasm for the SASS checks (tests/test_attention_sass.py)
                             "nvidia-cuda-cuobjdump; platform_system == 'Linux'",
                             "nvidia-cuda-nvdisasm; platform_system == 'Linux'"],
                    "bench": ["matplotlib"], "serve": SERVE_REQUIRES,
                    "mutation": ["mutmut>=3.3"]},   # scripts/mutation_test.sh (not CI)
    entry_points={"console_scripts": ["xverse-serve = xverse_engine.serve:main"]},
    ext_modules=[extension] + emulated_extension(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
