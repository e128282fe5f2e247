"""Static checks on the compiled lean-decode kernels (no GPU needed): the weight-streaming decode GEMM issues
tensor-core instructions (HMMA) fed by 16-byte global loads (LDG ... .128) and spills nothing; add_rmsnorm's
packed path moves rows with 16-byte loads and stores. Needs the extension built with its CUDA kernels (CI
builds them for sm_90a) and cuobjdump; skipped with the reason otherwise (test_attention_sass.py's helpers)."""
import re

from test_attention_sass import extension_sass, kernels_named, opcodes  # noqa: F401 (fixture)

WIDE_LOAD = re.compile(r"\bLDG\.E(?:\.\w+)*\.128\b")
WIDE_STORE = re.compile(r"\bSTG\.E(?:\.\w+)*\.128\b")


def check_decode_gemm(functions):
    kernels = kernels_named(functions, "decode_gemm_kernel")
    assert len(kernels) == 4, sorted(kernels)  # bf16 / fp16 x gate_up / down
    for name, sass in kernels.items():
        ops = opcodes(sass)
        assert "HMMA" in ops, f"{name}: no HMMA (tensor-core) instruction"
        assert WIDE_LOAD.search(sass), f"{name}: no 16-byte global load"
        assert not ops & {"STL", "LDL"}, f"{name}: spills to local memory"


def check_add_rmsnorm(functions):
    kernels = kernels_named(functions, "add_rmsnorm_kernel")
    packed = {n: s for n, s in kernels.items() if "Li8E" in n}  # 8 x 16-bit elements = 16 bytes
    assert len(packed) == 2, sorted(kernels)
    for name, sass in packed.items():
        assert WIDE_LOAD.search(sass) and WIDE_STORE.search(sass), f"{name}: rows not moved in 16-byte packs"
        assert not opcodes(sass) & {"STL", "LDL"}, f"{name}: spills to local memory"


def test_decode_gemm_streams_weights_into_tensor_cores(extension_sass):
    check_decode_gemm(extension_sass)


def test_add_rmsnorm_moves_16_byte_packs(extension_sass):
    check_add_rmsnorm(extension_sass)
