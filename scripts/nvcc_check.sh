#!/usr/bin/env bash
# Compile-checks CUDA sources for sm_90a with nvcc, without building the whole extension.
# usage: scripts/nvcc_check.sh [file.cu ...]   (default: every csrc/**/*.cu); prints the ptxas report.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-$(python3 - <<'PY'
import os, shutil, subprocess
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
real = nvcc
try:  # a wrapper script may exec the real nvcc: follow it
    text = open(nvcc, errors="ignore").read(4096)
    for word in text.split():
        if word.endswith("/bin/nvcc") and os.path.exists(word):
            real = word
except OSError:
    pass
print(os.path.dirname(os.path.dirname(os.path.realpath(real))))
PY
)}
includes=$(python3 - <<'PY'
import glob, os, site, sysconfig
from torch.utils.cpp_extension import include_paths
paths = include_paths()
for root in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]:
    paths += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
print(" ".join("-I" + p for p in dict.fromkeys(paths)))
PY
)
# C++20 when the installed torch's headers demand it (torch >= 2.13), as setup.py decides
std=$(python3 -c 'import os; from torch.utils.cpp_extension import include_paths as p; print("c++20" if "202002L" in open(os.path.join(p()[0], "ATen", "ATen.h")).read() else "c++17")' 2>/dev/null)
files=("$@")
[ ${#files[@]} -gt 0 ] || mapfile -t files < <(find csrc -name '*.cu' | sort)
[ ${#files[@]} -gt 0 ] || { echo "no .cu files"; exit 0; }
out=$(mktemp -d)
for f in "${files[@]}"; do
  echo "== nvcc sm_90a: $f"
  "$CUDA_HOME/bin/nvcc" -c "$f" -o "$out/$(basename "$f").o" -std=$std -O3 -lineinfo --expt-relaxed-constexpr \
    -gencode=arch=compute_90a,code=sm_90a -Xptxas=-v -Icsrc $includes \
    -D_GLIBCXX_USE_CXX11_ABI=$(python3 -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))') \
    -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
    -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ 2>&1 \
    | grep -v -E '^ptxas info\s*: (Compiling|Function properties)|^\s*0 bytes stack frame' || true
  test -f "$out/$(basename "$f").o" || { echo "FAILED: $f"; exit 1; }
done
echo "all ${#files[@]} CUDA files compile for sm_90a"
