"""Static checks on the compiled attention kernels (no GPU needed): the SASS of the built extension shows that
the tensor-core prefill really issues tensor-core (HMMA) and async-copy (LDGSTS) instructions, that the decode
kernel stages K/V with async copies (LDGSTS), and that none of them spills to local memory.

Needs the extension built with its CUDA kernels (CI builds them for sm_90a) and cuobjdump, from the CUDA
toolkit or the `nvidia-cuda-cuobjdump` wheel (in the `test` extra); skipped with the reason otherwise.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

from conftest import require_extension

require_extension()


def find_cuobjdump():
    """cuobjdump on PATH, in CUDA_HOME, or in the nvidia-cuda-cuobjdump wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "cu*", "bin", "cuobjdump"))
            candidates += glob.glob(os.path.join(root, "cuda_cuobjdump", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def sass_by_function(binary, cuobjdump):
    """{mangled kernel name: its SASS text} for every kernel in `binary` (an .so, .o or .cubin)."""
    text = subprocess.run([cuobjdump, "-sass", binary], check=True, capture_output=True, text=True).stdout
    functions, name = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            name = match.group(1)
            functions[name] = []
        elif name:
            functions[name].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


def opcodes(sass):
    """The set of instruction opcodes (without modifiers) in a SASS listing."""
    return set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))


@pytest.fixture(scope="module")
def extension_sass():
    import xverse_engine._C as ext
    if not getattr(ext, "built_with_cuda", False):
        pytest.skip("the extension was built without its CUDA kernels (XVERSE_NO_CUDA=1 or no CUDA toolkit): "
                    "no SASS to inspect")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found: pip install nvidia-cuda-cuobjdump (in the test extra) or set CUDA_HOME")
    return sass_by_function(ext.__file__, cuobjdump)


def kernels_named(functions, fragment):
    found = {name: sass for name, sass in functions.items() if fragment in name}
    assert found, f"no kernel whose mangled name contains {fragment!r} in the extension"
    return found


def test_prefill_mma_uses_tensor_cores_and_cp_async(extension_sass):
    """Every instantiation (bf16/fp16 x head_dim 64/80/96/128) of the tensor-core prefill."""
    kernels = kernels_named(extension_sass, "prefill_mma_kernel")
    assert len(kernels) == 8, sorted(kernels)
    for name, sass in kernels.items():
        ops = opcodes(sass)
        assert "HMMA" in ops, f"{name}: no HMMA (tensor-core) instruction in its SASS"
        assert "LDGSTS" in ops, f"{name}: no LDGSTS (cp.async) instruction in its SASS"
        assert "LDSM" in ops, f"{name}: no LDSM (ldmatrix) instruction in its SASS"
        assert not ops & {"STL", "LDL"}, f"{name}: spills to local memory ({sorted(ops & {'STL', 'LDL'})})"


def test_decode_kernels_stage_kv_with_cp_async_and_do_not_spill(extension_sass):
    """Every instantiation of the decode kernel (3 dtypes x head_dim 64/80/96/128 x 1/2/4/8 query heads per
    block) copies its K/V tiles with LDGSTS (cp.async) and spills nothing; the reduce kernels spill nothing."""
    decode = kernels_named(extension_sass, "paged_decode_kernel")
    assert len(decode) == 48, sorted(decode)
    for name, sass in decode.items():
        ops = opcodes(sass)
        assert "LDGSTS" in ops, f"{name}: no LDGSTS (cp.async) instruction in its SASS"
        assert not ops & {"STL", "LDL"}, f"{name}: spills to local memory ({sorted(ops & {'STL', 'LDL'})})"
    reduce = kernels_named(extension_sass, "paged_decode_reduce_kernel")
    assert len(reduce) == 12, sorted(reduce)
    for name, sass in reduce.items():
        assert not opcodes(sass) & {"STL", "LDL"}, f"{name}: spills to local memory"
