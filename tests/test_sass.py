"""What the built CUDA kernels are made of, read from their machine code
(cuobjdump --dump-sass), with no GPU: every op built for sm_80 and sm_90a,
no local memory (register spills or run-time-indexed arrays) in any kernel,
16-byte loads and stores in the vectorised elementwise kernels, tensor cores
(HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) in the attention kernels, and
warpgroup tensor cores (HGMMA), the bulk tensor copy engine (UTMALDG) and
mbarriers (SYNCS) in the sm_90a attention forward and backward, and the
forward's named barriers (BAR.SYNC / BAR.ARV) for its warpgroups' turns."""
import functools
import glob
import os
import re
import shutil
import subprocess

import pytest

from pyext import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90a")

if not _backend.CUDA_BUILT:
    pytest.skip(f"extension not built: {_backend._CUDA_BUILD_NOTE}", allow_module_level=True)


def _cuobjdump():
    """The toolkit's cuobjdump (it knows every arch the toolkit's nvcc builds),
    else the one Triton ships. Triton 3.6's is CUDA 12.8's, whose --list-elf
    names sm_90a code "sm_90"; this machine's toolkit has none, Triton 3.8's
    is CUDA 13.1's."""
    nvcc = shutil.which("nvcc")
    beside_nvcc = os.path.join(os.path.dirname(nvcc), "cuobjdump") if nvcc else ""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        bundled = ""
    for candidate in (beside_nvcc, shutil.which("cuobjdump"), bundled):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


CUOBJDUMP = _cuobjdump()
if CUOBJDUMP is None:
    pytest.skip("no cuobjdump (neither Triton's nor the toolkit's)", allow_module_level=True)


def _extension():
    from pyext import _C
    return _C.__file__


@functools.lru_cache(maxsize=None)
def _sass(arch):
    """{mangled kernel name: its SASS} for one architecture."""
    out = subprocess.run([CUOBJDUMP, "--dump-sass", "--gpu-architecture", arch, _extension()],
                         capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", out)
    return dict(zip(parts[1::2], parts[2::2]))


@functools.lru_cache(maxsize=None)
def _listed_as(arch):
    """The name --list-elf gives `arch` code. A CUDA 12 cuobjdump (Triton 3.6
    ships 12.8's, used where the toolkit's is missing) names sm_90a code
    "sm_90"; that it is sm_90a code (wgmma, TMA) the tests below check."""
    version = subprocess.run([CUOBJDUMP, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release (\d+)\.", version)
    return "sm_90" if arch == "sm_90a" and release and int(release.group(1)) < 13 else arch


def test_every_op_is_built_for_ampere_and_hopper():
    listing = subprocess.run([CUOBJDUMP, "--list-elf", _extension()], capture_output=True, text=True,
                             check=True).stdout
    ops = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))}
    for op in ops:
        for arch in ARCHS:
            assert f"{op}.{_listed_as(arch)}.cubin" in listing, f"{op} has no {arch} code:\n{listing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_uses_local_memory(arch):
    kernels = _sass(arch)
    assert kernels
    spilling = [name for name, code in kernels.items() if re.search(r"\b(LDL|STL)\b", code)]
    assert not spilling, f"local memory in {spilling}"


@pytest.mark.parametrize("arch", ARCHS)
def test_vectorised_gelu_kernels_move_16_bytes_per_access(arch):
    vectorised = {n: c for n, c in _sass(arch).items() if "gelu_" in n and "Li1EE" not in n}
    assert len(vectorised) == 8  # fwd and bwd, four dtypes
    for name, code in vectorised.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, name


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_kernels_move_the_moments_16_bytes_per_access(arch):
    kernels = {n: c for n, c in _sass(arch).items() if "adamw_kernel" in n}
    assert len(kernels) == 3, sorted(kernels)  # fp32, fp16, bf16 parameters
    for name, code in kernels.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, name
        if "adamw_kernelIfE" not in name:  # four fp16/bf16 parameters or gradients: 8 bytes
            assert "LDG.E.64" in code and "STG.E.64" in code, name


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_attention_kernels_use_tensor_cores_ldmatrix_and_cp_async(arch):
    kernels = {n: c for n, c in _sass(arch).items()
               if re.search(r"flash_(fwd|bwd_dkdv|bwd_dq)_kernel", n)}
    # fwd, dK/dV (with and without the dQ atomics), dQ; two dtypes; eight head dims
    assert len(kernels) == 4 * 2 * 8, sorted(kernels)
    for name, code in kernels.items():
        for op in ("HMMA.16816.F32", "LDSM", "LDGSTS"):
            assert op in code, f"{op} missing from {name}"
        assert not re.search(r"\b(LDL|STL)\b", code), f"local memory in {name}"


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_forward_feeds_each_k_v_fragment_to_two_query_tiles(arch):
    """Stage 1's forward per key tile, as flash_fwd_kernel.cuh counts it: a
    warp owns kMT tiles of 16 query rows (2 up to head dim 128, 1 above) and
    each ldmatrix of K or V feeds kMT mma.sync, so the loop body holds
    kMT D N / 64 HMMA for D / 16 (kMT + N / 16) + N / 16 D / 16 LDSM
    (N keys a tile: 64 up to 128, 32 above): 3.2 products per shared read
    up to D 128, 1.6 above."""
    kernels = {n: c for n, c in _sass(arch).items() if "flash_fwd_kernel" in n}
    assert len(kernels) == 2 * 8, sorted(kernels)
    for name, code in kernels.items():
        d = int(re.search(r"Li(\d+)EE", name).group(1))
        tiles, keys = (2, 64) if d <= 128 else (1, 32)
        assert code.count("HMMA.16816.F32") == tiles * d * keys // 64, name
        assert len(re.findall(r"\bLDSM\S*", code)) == d // 16 * (tiles + keys // 16) + keys // 16 * d // 16, name


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_backward_adds_dq_with_atomics(arch):
    """Stage 1's non-deterministic dK/dV kernel (kAccumulateDq, the
    template's last argument true) against its deterministic twin: a warp's
    16 x 32 dQ tile over the step's 64 keys is 16 more mma.sync, added to
    dq_accum with 8 two-float atomic adds a thread (sm_90a) or 16 one-float
    ones (sm_80: no vector red), 2 rows x 4 column pairs."""
    sass = {n: c for n, c in _sass(arch).items() if "flash_bwd_dkdv_kernel" in n}
    atomic = {n: c for n, c in sass.items() if "Lb1E" in n}
    assert len(atomic) == 2 * 8, sorted(sass)
    red = r"REDG\.E\.ADD\.F32x2\S*" if arch == "sm_90a" else r"\bRED\.E\.ADD\.F32\S*"
    for name, code in atomic.items():
        twin = sass[name.replace("Lb1E", "Lb0E")]
        assert code.count("HMMA.16816.F32") == twin.count("HMMA.16816.F32") + 16, name
        reds = len(re.findall(red, code))
        assert reds == (8 if arch == "sm_90a" else 16) and not re.search(red, twin), f"{reds} atomics in {name}"


def assert_sm90_pipeline(name, code):
    """What every sm_90a attention kernel shows: register-A HGMMA with B
    transposed from shared memory, TMA loads on mbarriers, warp groups'
    setmaxnreg; no mma.sync and no local memory."""
    assert re.search(r"HGMMA\.64x(64|128)x16\.F32\S* R\d+, R\d+, gdesc\[UR\d+\]\.tnspB", code), \
        f"no register-A HGMMA with transposed B in {name}"
    for op in ("UTMALDG.4D", "SYNCS.ARRIVE.TRANS64", "SYNCS.PHASECHK.TRANS64", "WARPGROUP.DEPBAR",
               "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"):
        assert op in code, f"{op} missing from {name}"
    assert "HMMA.16816" not in code, f"mma.sync in {name}"
    assert not re.search(r"\b(LDL|STL)\b", code), f"local memory in {name}"


def test_sm90_flash_forward_uses_wgmma_tma_and_mbarriers():
    kernels = {n: c for n, c in _sass("sm_90a").items() if "flash_fwd_sm90_kernel" in n}
    assert len(kernels) == 2 * 2, sorted(kernels)  # two dtypes; head dims 64 and 128
    for name, code in kernels.items():
        # S = Q K^T: 64x128 tiles, both operands from shared memory; O += P V:
        # A (P) from registers, B (V) transposed from shared memory.
        assert re.search(r"HGMMA\.64x128x16\.F32\S* R\d+, gdesc", code), f"no SS HGMMA in {name}"
        # the consumer warpgroups' turns (ping-pong): named barriers of 256 threads
        assert re.search(r"BAR\.SYNC\S* R\d+, 0x100", code) and re.search(r"BAR\.ARV \S+, 0x100", code), \
            f"no ping-pong named barriers in {name}"
        assert_sm90_pipeline(name, code)


@pytest.mark.parametrize("kernel, count", [("flash_bwd_dkdv_sm90_kernel", 2 * 2 * 2),
                                           ("flash_bwd_dq_sm90_kernel", 2 * 2)])
def test_sm90_flash_backward_uses_wgmma_tma_and_mbarriers(kernel, count):
    kernels = {n: c for n, c in _sass("sm_90a").items() if kernel in n}
    # two dtypes; head dims 64 and 128; dK/dV with and without the dQ atomics
    assert len(kernels) == count, sorted(kernels)
    for name, code in kernels.items():
        # dK/dV: S^T = K Q^T, dP^T = V dO^T (dQ: S = Q K^T, dP = dO V^T), 64
        # x 64 tiles, both operands from shared memory; dV += P^T dO, dK +=
        # dS^T Q (dQ += dS K): A from registers, B transposed from shared memory.
        assert re.search(r"HGMMA\.64x64x16\.F32\S* R\d+, gdesc", code), f"no SS HGMMA in {name}"
        assert_sm90_pipeline(name, code)


def test_sm90_flash_backward_adds_dq_with_vector_atomics():
    """The non-deterministic dK/dV kernel (kAccumulateDq, the template's
    last argument true): dQ = dS K with A and B read transposed from shared
    memory, 8 per step (128 keys / 16); dS^T stored to shared memory, ordered
    before the async proxy's reads, the warpgroups met on named barrier 1
    (256 threads); 16 (D 128) or 8 (D 64) 8-byte atomic adds a thread a step;
    then the pass that rounds the fp32 sum into dq."""
    kernels = {n: c for n, c in _sass("sm_90a").items() if "flash_bwd_dkdv_sm90_kernel" in n and "Lb1E" in n}
    assert len(kernels) == 2 * 2, sorted(kernels)
    for name, code in kernels.items():
        assert len(re.findall(r"HGMMA\.64x(32|64)x16\.F32\S* R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB", code)) == 8, name
        assert "FENCE.VIEW.ASYNC.S" in code and re.search(r"BAR\.SYNC\S* 0x1, 0x100", code), name
        reds = len(re.findall(r"REDG\.E\.ADD\.F32x2", code))
        assert reds == (16 if "Li128E" in name else 8), f"{reds} REDG in {name}"
    # then dq = the fp32 sum rounded: 16-byte loads and stores
    converts = {n: c for n, c in _sass("sm_90a").items() if "flash_bwd_dq_convert_kernel" in n}
    assert len(converts) == 2, sorted(converts)
    for name, code in converts.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, name


@pytest.mark.parametrize("kernel, count", [("flash_fwd_sm90_kernel", 2 * 2), ("flash_bwd_dkdv_sm90_kernel", 2 * 2 * 2),
                                           ("flash_bwd_dq_sm90_kernel", 2 * 2)])
def test_sm90_flash_kernels_are_stubs_for_sm80(kernel, count):
    """The sm_80 pass compiles the sm_90a-only kernels to a trap: no tensor core code."""
    kernels = {n: c for n, c in _sass("sm_80").items() if kernel in n}
    assert len(kernels) == count, sorted(kernels)
    for name, code in kernels.items():
        assert "BPT.TRAP" in code and "HMMA" not in code, name
