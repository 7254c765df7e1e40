"""The Triton kernels as a GPU would compile them, checked without a GPU: each compiles for the two
architectures the package builds for, sm_80 (Ampere) and sm_90 (Hopper), at the configurations the
launchers pick, fits the shared memory a block may use there (163 KB on an A100, 227 KB on an H100), and
keeps its registers (no spills to local memory, which would turn these bandwidth-bound kernels into
latency-bound ones, and the on-chip eigensolver into one that streams its matrix). The CPU interpreter
used by the other tests never compiles anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maskedssl.kernels import mix_patchify as mp, ncut

ARCH = int(sys.argv[1])
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(kernel, pointers, constexprs, num_warps):
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in pointers
             and pointers[n].startswith("*")}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(item.split(":") for item in text[text.index("REG:"):].split()[:4])
    return {"shared": compiled.metadata.shared, "regs": int(fields["REG"]), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"])}


rows = {}
solver_consts = dict(STEPS=ncut.STEPS, CHECK=ncut.CHECK, MAX_CYCLES=ncut.MAX_CYCLES, TOL=ncut.TOL,
                     SHIFTS=ncut.SHIFTS, ROUNDS=ncut.ROUNDS, DELTA=ncut.DELTA, INV_ITERS=ncut.INV_ITERS,
                     PIVMIN=ncut.PIVMIN)
for n in (49, 128, 196, 300, 576):
    for dtype, precision in (("bf16", "tf32"), ("fp32", "tf32x3")):
        cfg = ncut.launch_config(n, 768, fp32=dtype == "fp32")
        pointers = dict(f_ptr="*" + dtype, c_ptr="*fp32", deg_ptr="*fp32", q_ptr="*fp32", t_ptr="*fp32",
                        v_ptr="*fp32", p_ptr="*i32", tau="fp32", eps="fp32")
        rows[f"ncut solver N={n} {dtype}"] = usage(
            ncut._solver_kernel, pointers,
            # 16-bit features on chip at D = 768 write C for the partition step (2 N <= D)
            dict(USE_TAU=False, COUNT_PRODUCTS=False, PRECISION=precision, ON_CHIP=cfg["on_chip"],
                 WRITE_COS=cfg["on_chip"] and dtype == "bf16", N_PAD=cfg["n_pad"],
                 BLOCK_K=cfg["block_k"], BLOCK_R=cfg["block_r"], Q_CHUNK=cfg["q_chunk"], **solver_consts),
            cfg["num_warps"])
for dtype, precision in (("bf16", "tf32"), ("fp32", "tf32x3")):
    block_k = ncut.launch_config(196, 768, fp32=dtype == "fp32")["affinity_block_k"]
    rows[f"ncut affinity {dtype}"] = usage(
        ncut._affinity_kernel,
        dict(f_ptr="*" + dtype, c_ptr="*fp32", deg_ptr="*fp32", sq_ptr="*fp32", tau="fp32", eps="fp32"),
        dict(USE_TAU=True, PRECISION=precision, BLOCK_I=ncut.ROW_BLOCK, BLOCK_J=64, BLOCK_K=block_k), 4)
for dtype, d, only in (("bf16", 768, True), ("fp32", 1024, False), ("fp16", 8192, False)):
    d_pad = triton.next_power_of_2(d)
    rows[f"ncut partition D={d} {dtype}"] = usage(
        ncut._partition_kernel,
        dict(f_ptr="*" + dtype, v_ptr="*fp32", fiedler_ptr="*fp32", fg_ptr="*u8", score_ptr="*fp32",
             only_ptr="*u8", seed_scale="fp32", split_tie="fp32"),
        dict(N_PAD=256, BLOCK_N=max(1, min(256, ncut.PARTITION_TILE // d_pad)), D_PAD=d_pad, ONLY=only), 8)
for n_pad in (256, 1024):
    rows[f"ncut partition from cosines N_PAD={n_pad}"] = usage(
        ncut._partition_cos_kernel,
        dict(c_ptr="*fp32", v_ptr="*fp32", fiedler_ptr="*fp32", fg_ptr="*u8", score_ptr="*fp32",
             redo_ptr="*u8", seed_scale="fp32", split_tie="fp32", min_mean_sq="fp32"),
        dict(N_PAD=n_pad, BLOCK_R=max(1, ncut.PARTITION_TILE // n_pad)), 8)
for p, c, src in ((16, 3, "*u8"), (16, 3, "*fp32"), (4, 3, "*bf16"), (14, 1, "*fp16")):
    cfg = mp.launch_config(p, c)
    pointers = dict(imgs=src, partner="*i64", lam="*fp32", ids_keep="*i64", ids_masked="*i64", mean="*fp32",
                    std="*fp32", inputs="*bf16", target="*bf16", other="*bf16")
    rows[f"mix_patchify p={p} C={c} {src[1:]}"] = usage(
        mp._mix_patchify_kernel, pointers,
        dict(P=p, C=c, BLOCK_R=cfg["block_r"], ROWS=cfg["rows"], MIX=True, NORM_PIX=True, NORMALIZE=True),
        cfg["num_warps"])
print(json.dumps(rows))
"""

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block: A100, H100
# Known small spills, in bytes per thread. On sm_80 the on-chip solver with fp32 features at N_PAD = 128
# keeps 10 floats on the stack (Triton 3.8: 12 LDL + 17 STL, all in the one-off 3xTF32 affinity loop
# before the Lanczos iterations, by its SASS); at the previous 32-column K block it was 488 bytes.
# On the tiled path (N_PAD >= 512) Triton 3.8's ptxas holds the solver to 64 registers on sm_80 and keeps
# one or two values on the stack: 8 bytes, each stored once and loaded once in the whole kernel, by its SASS.
ALLOWED_STACK = {(80, "ncut solver N=128 fp32"): 64,
                 **{(arch, f"ncut solver N={n} {dtype}"): 8 for arch in (80, 90) for n in (300, 576)
                    for dtype in ("bf16", "fp32")}}


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_triton_kernels_compile_within_resources(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 21
    for name, use in rows.items():
        assert use["shared"] <= SHARED_LIMIT[arch], (name, use)
        assert use["stack"] <= ALLOWED_STACK.get((arch, name), 0), f"{name} spills registers: {use}"
        assert use["local"] == 0, f"{name} uses local memory: {use}"
        assert use["regs"] <= 255, (name, use)


_PARTITION_PTX = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maskedssl.kernels import ncut

# bf16 features (D = 768): the launcher specialises a unit column stride to a constant and marks 16-byte
# aligned pointers and strides, as given here by hand
kernel = ncut._partition_kernel
pointers = dict(f_ptr="*bf16", v_ptr="*fp32", fiedler_ptr="*fp32", fg_ptr="*u8", score_ptr="*fp32",
                only_ptr="*u8")
constexprs = dict(s_d=1, N_PAD=256, BLOCK_N=ncut.PARTITION_TILE // 1024, D_PAD=1024, ONLY=True)
floats = ("seed_scale", "split_tie")
signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
             for n in kernel.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
         if n in pointers or n in ("D", "s_b", "s_n")}
ptx = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 8}).asm["ptx"]
assert re.search(r"ld\.global(\.nc)?\.v4", ptx), "no 16-byte loads of the features"
"""


def test_triton_partition_kernel_reads_features_16_bytes_at_a_time():
    """ncut's partition kernel reads the features twice: with contiguous, aligned rows each load is 16
    bytes (8 bf16 values), as in the CUDA kernel's vector variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PARTITION_PTX], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


# The CUDA kernels of maskedssl._C as built (every arch of TORCH_CUDA_ARCH_LIST), read back with cuobjdump.
# No stack frame: local arrays or spills would put loads from L1 into chains the whole block waits on
# (before the tridiagonal solve of lanczos_kernel was reworked it kept 256 bytes there). The one known
# exception: ptxas keeps mix_patchify_kernel at 80 registers (three 256-thread blocks per SM) by spilling
# 8-12 bytes; forcing no spill costs 114-120 registers and a third of the resident blocks.
CUDA_ALLOWED_STACK = {"mix_patchify_kernel": 16}
# lanczos_kernel at N <= ~120 fits two blocks per SM by shared memory: registers must allow it too.
CUDA_MAX_REGS = {"lanczos_kernel": 128}


def _cuobjdump(flag: str) -> str:
    """cuobjdump's output for the built maskedssl._C (Triton ships the binary)."""
    import importlib.util

    import triton

    spec = importlib.util.find_spec("maskedssl._C")
    if spec is None:
        pytest.skip("maskedssl._C not built: `make build` builds it when nvcc exists")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([cuobjdump, flag, spec.origin], capture_output=True, text=True, check=True).stdout


def _cuda_kernel_usage() -> list[tuple[str, str, dict]]:
    import re

    text = _cuobjdump("-res-usage")
    rows, arch, name = [], None, None
    for line in text.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            kernel = next((k for k in ("gather_rows_kernel", "invert_index_kernel", "segment_sum_kernel",
                                       "masked_sum_kernel", "mix_patchify_kernel", "lanczos_kernel",
                                       "partition_gram_kernel", "partition_kernel")
                           if k in name), name)
            rows.append((arch, kernel, dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))))
    return rows


def test_cuda_kernels_keep_to_registers():
    rows = _cuda_kernel_usage()
    archs = {arch for arch, _, _ in rows}
    assert {"sm_80", "sm_90"} <= archs or os.environ.get("TORCH_CUDA_ARCH_LIST"), archs
    kernels = {kernel for _, kernel, _ in rows}
    expected = {"gather_rows_kernel", "mix_patchify_kernel", "lanczos_kernel", "partition_kernel",
                "partition_gram_kernel"}
    assert expected <= kernels, kernels
    for arch, kernel, use in rows:
        assert use["stack"] <= CUDA_ALLOWED_STACK.get(kernel, 0), (arch, kernel, use)
        assert use["local"] == 0, (arch, kernel, use)
        assert use["regs"] <= CUDA_MAX_REGS.get(kernel, 255), (arch, kernel, use)


def test_cuda_vector_kernels_move_16_bytes_per_access():
    """The vector variants of the token kernels and of ncut's partition kernel (VEC = 16 bytes of the element
    type) load (and the token kernels store) 16 bytes at a time in the SASS, as the Triton token kernels do
    in their PTX."""
    import re

    text = _cuobjdump("-sass")
    bodies = re.split(r"\n\s*Function : (\S+)\s*\n", text)
    vector = {}
    for name, body in zip(bodies[1::2], bodies[2::2]):
        # mangled template arguments: gather_rows_kernel<T, I, 8> for 16-bit T, <float, I, 4>
        if m := re.search(r"(gather_rows|segment_sum|masked_sum|partition)_kernel.*?(Li8E|Li4E)", name):
            vector.setdefault(m.group(1), []).append((len(re.findall(r"LDG\.E\.128", body)),
                                                      len(re.findall(r"STG\.E\.128", body))))
    assert set(vector) == {"gather_rows", "segment_sum", "masked_sum", "partition"}, sorted(vector)
    for kernel, counts in vector.items():
        assert all(loads > 0 for loads, _ in counts), (kernel, counts)
        # masked_sum's outputs are fp32 partial sums, one per column; partition writes a few values per row
        if kernel not in ("masked_sum", "partition"):
            assert all(stores > 0 for _, stores in counts), (kernel, counts)


def test_cuda_gram_partition_issues_a_rows_loads_before_its_fmas():
    """partition_gram_kernel reads each foreground row of G as 32 loads per lane (columns lane + 32 c): all
    of them must be in flight before the first FMA uses one. Written as load-then-FMA per column, ptxas
    interleaved them and each FMA waited for its load: one load in flight per warp."""
    import re

    text = _cuobjdump("-sass")
    bodies = re.split(r"\n\s*Function : (\S+)\s*\n", text)
    found = 0
    for name, body in zip(bodies[1::2], bodies[2::2]):
        if "partition_gram_kernel" not in name:
            continue
        ops = "".join("L" if "LDG" in line else "F" for line in body.splitlines()
                      if re.search(r"\b(LDG|FFMA)\b", line))
        assert "L" * 32 in ops, ops
        found += 1
    assert found >= 2, found  # sm_80 and sm_90
