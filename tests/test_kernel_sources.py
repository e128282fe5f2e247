"""Static properties of the kernel sources: every inline PTX goes through csrc/common/ptx.cuh (whose asm
carries the "memory" clobbers that cp.async and ldmatrix need) and every launch through launch_kernel
(csrc/common/launch.cuh), so the emulator can run the same files; and the grouped GEMM's shared-memory
budget counts static and dynamic shared memory (checked by compiling the tile header with the host compiler)."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
# Kernel directories converted to the shared PTX / launch helpers.
CONVERTED = ["moe", "fused", "attention"]


def kernel_files():
    files = []
    for sub in CONVERTED:
        folder = os.path.join(CSRC, sub)
        files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith((".cu", ".cuh"))]
    return files


@pytest.mark.parametrize("path", kernel_files(), ids=lambda p: os.path.relpath(p, CSRC))
def test_no_raw_asm_or_triple_chevron_launch(path):
    text = open(path).read()
    code = re.sub(r"//[^\n]*", "", text)  # comments may name the syntax
    assert not re.search(r"\basm\b", code), f"{path}: inline PTX belongs in csrc/common/ptx.cuh"
    assert "<<<" not in code, f"{path}: launch through xverse::launch_kernel (csrc/common/launch.cuh)"


def test_ptx_wrappers_clobber_memory():
    """cp.async and ldmatrix read / write shared memory behind the compiler's back: each asm says "memory"."""
    text = open(os.path.join(CSRC, "common", "ptx.cuh")).read()
    for name in ("cp_async_16", "cp_async_commit", "cp_async_wait", "ldmatrix_x4"):
        body = text[text.index(name):]
        body = body[: body.index("}\n")]
        assert '"memory"' in body, f"ptx.cuh: {name} needs a \"memory\" clobber"


def host_compiler():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def compile_tiles(tmp_path, body: str):
    source = tmp_path / "tiles.cpp"
    source.write_text('#include "moe/gemm_tiles.h"\n' + body + "\nint main() { return 0; }\n")
    return subprocess.run([host_compiler(), "-std=c++17", "-fsyntax-only", f"-I{CSRC}", str(source)],
                          capture_output=True, text=True)


@pytest.mark.skipif(host_compiler() is None, reason="no host C++ compiler")
def test_shipped_tiles_fit_the_shared_memory_budget(tmp_path):
    result = compile_tiles(tmp_path, "using namespace xverse::moe;\n"
                           "static_assert(SmallTile::SMEM_BYTES > 0 && MidTile::SMEM_BYTES > 0 && "
                           "PrefillTile::SMEM_BYTES + PrefillTile::STATIC_SMEM_BYTES <= 48 * 1024);")
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(host_compiler() is None, reason="no host C++ compiler")
def test_budget_counts_static_shared_memory(tmp_path):
    """A tile whose dynamic ring fits in 48 KB (2 x (64 + 240) x 80 B = 48,640 B) but not with its 1,024 B of
    static row ids must be rejected at compile time."""
    result = compile_tiles(tmp_path, "constexpr int bytes = xverse::moe::TileConfig<64, 240, 4, 1, 2>::SMEM_BYTES;\n"
                                     "static_assert(bytes == 48640);")
    assert result.returncode != 0, "a tile over the static + dynamic budget compiled"
    assert "static + dynamic shared memory" in result.stderr, result.stderr
