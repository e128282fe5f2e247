"""How the emulated extension (xverse_engine._emu) is compiled, shared by setup.py and the lazily built
sanitizer variants (xverse_engine/ops/emulated.py). Plain Python, no torch import: setup.py loads it by path.

Every csrc/**/*.cu is compiled by the host compiler as C++ with -DXVERSE_EMULATE and the emulator's CUDA
environment force-included (csrc/emu/cuda_emu.h). The build compiles a copy of each .cu / .cuh (under
build/.../emu_src, found first on the include path) in which every `__shared__` declaration is followed, on
the same line, by XVERSE_EMU_REGISTER_SHARED(name): the emulator then poisons that array at every block
start (g++ cannot place template statics in a section). A #line directive keeps errors and the emulator's
reports pointing at the original file and line. csrc/emu/shim stands in for the few CUDA-only torch headers
the launchers include.
"""
import glob
import os
import re
import site
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SANITIZERS = {"address": "asan", "thread": "tsan"}


def cuda_include_dir():
    """A directory holding cuda_bf16.h (the toolkit's, else the nvidia wheels'), or None."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "include"))
    candidates += ["/usr/local/cuda/include"] + sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    roots = site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    for root in roots:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")))
        candidates.append(os.path.join(root, "nvidia", "cuda_runtime", "include"))
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_bf16.h")) and os.path.isfile(os.path.join(path, "vector_types.h")):
            return path
    return None


def kernel_sources(repo=REPO):
    return sorted(glob.glob(os.path.join(repo, "csrc", "**", "*.cu"), recursive=True))


SHARED_DECLARATION = re.compile(r"^([ \t]*)__shared__\b([^;]*);", re.MULTILINE)
DECLARED_NAME = re.compile(r"(\w+)\s*(\[[^;]*\])?\s*$")


def register_shared_declarations(text):
    """Appends XVERSE_EMU_REGISTER_SHARED(name); to every `__shared__ ... name[...];` statement."""
    def add(match):
        name = DECLARED_NAME.search(match.group(2)).group(1)
        return f"{match.group(0)} XVERSE_EMU_REGISTER_SHARED({name});"
    return SHARED_DECLARATION.sub(add, text)


def _write_if_changed(path, text):
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def emu_source_dir(build_dir):
    return os.path.join(build_dir, "emu_src")


def write_emulated_sources(build_dir, repo=REPO):
    """Copies csrc/**/*.cu (as <name>.cu.cpp, so setuptools compiles them as C++) and *.cuh into
    emu_source_dir(build_dir) with the shared-memory registrations; returns the .cpp units."""
    csrc = os.path.join(repo, "csrc")
    out = emu_source_dir(build_dir)
    units = []
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True) +
                       glob.glob(os.path.join(csrc, "**", "*.cuh"), recursive=True)):
        rel = os.path.relpath(path, csrc)
        if rel.startswith("emu" + os.sep):
            continue
        with open(path) as f:
            text = f'#line 1 "{path}"\n' + register_shared_declarations(f.read())
        target = os.path.join(out, rel + (".cpp" if path.endswith(".cu") else ""))
        _write_if_changed(target, text)
        if path.endswith(".cu"):
            units.append(target)
    return units


def sources(build_dir, repo=REPO):
    emu = os.path.join(repo, "csrc", "emu")
    return write_emulated_sources(build_dir, repo) + [os.path.join(emu, name) for name in
                                                      ("runtime.cpp", "emu_bindings.cpp", "selftest_kernels.cpp")]


def include_dirs(build_dir, repo=REPO):
    cuda = cuda_include_dir()
    if cuda is None:
        raise RuntimeError("the CUDA emulator needs cuda_bf16.h: install the CUDA toolkit (set CUDA_HOME) or the "
                           "nvidia-cuda-runtime wheel")
    return [emu_source_dir(build_dir), os.path.join(repo, "csrc", "emu", "shim"), os.path.join(repo, "csrc"), cuda]


def cxx_flags(sanitizer=None):
    # -O1: the emulation's cost is thread hand-offs, not the kernels' arithmetic; compile time matters more.
    # Sanitized builds: -O0 (faster to compile, exact stacks).
    flags = ["-O0" if sanitizer else "-O1", "-std=c++20", "-g0", "-pthread", "-ffp-contract=off", "-DXVERSE_EMULATE",
             "-DXVERSE_WITH_CUDA=1", "-include", "emu/cuda_emu.h", "-Wno-unused-variable", "-Wno-unknown-pragmas"]
    if sanitizer:
        flags += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
    return flags


def link_flags(sanitizer=None):
    return ["-pthread"] + ([f"-fsanitize={sanitizer}"] if sanitizer else [])
