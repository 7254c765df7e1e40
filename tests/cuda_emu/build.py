"""Build the kernels of ``csrc/`` for the CPU under the emulator of ``cuda_emu.h`` and load them.

Each ``csrc/*.cu`` is copied with a few mechanical rewrites, then compiled by the host compiler with
``cuda_emu.h`` force-included and ``include/`` (stand-ins for the c10/cuda headers) searched first:

- ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
  ``cpu_emu::launch(config, kernel, "kernel", args)``;
- ``__shared__`` declarations become function-level statics (one block runs at a time), refilled with 0xFF
  at every block; ``extern __shared__`` arrays point at the launch's dynamic shared memory;
- ``TORCH_LIBRARY_IMPL(<namespace>, CUDA, m)`` registers for ``CPU``; ``x.is_cuda()`` asks ``x.is_cpu()``;
  ``x.get_device()`` is device 0; ATen calls with no CPU kernel (``at::bmm`` with an output dtype) go to
  ``cuda_emu_aten.h``, included after the source's own includes.

The schemas come from ``maskedssl._C`` (``csrc/register.cpp``), which must be loaded first: the library
built here adds CPU kernels to the same ops, so ``torch.ops.maskedssl.<op>_cuda`` on CPU tensors runs the
emulated CUDA code. ``selftest.cu`` adds kernels that check the emulator itself (tests/test_cuda_emulator.py).
ninja keeps the objects under ``build/cuda_emu``: an unchanged ``csrc/`` rebuilds nothing.
"""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(ROOT, "build", "cuda_emu")
NAME = "maskedssl_cuda_emulated"
# gridDim.y's limit in the emulated build (a GPU's is 65535): low enough that csrc/token_gather.cu chunks the
# batch over grid y for any batch of 4 rows or more, a path a GPU takes only past 65535 rows
MAX_GRID_Y = 3


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes ``text[start]`` (an ``open_``)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_!r} at offset {start}")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (``name`` or ``ns::name<T, N>``) that ends at ``end``."""
    i = end
    if text[i - 1] == ">":  # template arguments: walk back to their '<'
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    out = []
    pos = 0
    while (open_at := text.find("<<<", pos)) != -1:
        start = _kernel_start(text, open_at)
        kernel = text[start:open_at]
        close_at = text.index(">>>", open_at)
        config = text[open_at + 3:close_at]
        paren = close_at + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise ValueError(f"launch of {kernel} without an argument list")
        args_end = _matching(text, paren, "(", ")")
        args = text[paren + 1:args_end - 1].strip()
        call = f'::cpu_emu::launch(::cpu_emu::LaunchConfig({config}), {kernel}, "{" ".join(kernel.split())}"'
        out.append(text[pos:start] + call + (f", {args})" if args else ")"))
        pos = args_end
    out.append(text[pos:])
    return "".join(out)


_SHARED = re.compile(r"(extern\s+)?__shared__\s+(?:__align__\((\d+)\)\s+)?([^;]+);")
_DECLARATOR = re.compile(r"^(?P<type>.*?)\b(?P<name>\w+)\s*(?P<dims>(\[[^\]]*\])*)\s*$", re.S)


def _shared_declaration(match: re.Match) -> str:
    extern, align, body = match.group(1), match.group(2), match.group(3)
    pieces = [p.strip() for p in body.split(",")]
    first = _DECLARATOR.match(pieces[0])
    if first is None:
        raise ValueError(f"cannot read the __shared__ declaration {match.group(0)!r}")
    type_ = first.group("type").strip()
    if extern:
        return f"{type_}* const {first.group('name')} = ::cpu_emu::dynamic_shared<{type_}>();"
    statements = []
    for i, piece in enumerate(pieces):
        declarator = _DECLARATOR.match(piece if i == 0 else f"{type_} {piece}")
        name, dims = declarator.group("name"), declarator.group("dims")
        aligned = f"alignas({align}) " if align else ""
        statements.append(f"{aligned}static {type_} {name}{dims}; "
                          f"::cpu_emu::static_shared(&{name}, sizeof({name}));")
    return " ".join(statements)


def rewrite_source(text: str) -> str:
    text = rewrite_launches(text)
    last_include = max(m.end() for m in re.finditer(r"^#include .*$", text, re.M))
    text = text[:last_include] + '\n#include "cuda_emu_aten.h"' + text[last_include:]
    text = text.replace("at::bmm(", "::cpu_emu::bmm(")
    text = _SHARED.sub(_shared_declaration, text)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(\s*(\w+)\s*,\s*CUDA\s*,", r"TORCH_LIBRARY_IMPL(\1, CPU,", text)
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = re.sub(r"([\w\->.]+)\.get_device\(\)", r"::cpu_emu::device_index(&\1)", text)
    return text


def build_and_load(sanitize: bool = False, verbose: bool = False) -> str:
    """Rewrite, compile (cached) and load the emulated kernels; returns the library's path.

    ``sanitize``: build with AddressSanitizer and UBSan's alignment check (under ``build/cuda_emu_asan``), so
    that a kernel reading or writing outside a tensor's memory, or through a pointer misaligned for its type
    (a 16-byte vector load from an address that is not a multiple of 16: a fault on a GPU), stops the process
    with a report naming the kernel and line. The process must start with the ASan runtime preloaded
    (``make test-asan`` does it).
    """
    from torch.utils import cpp_extension

    build = BUILD + "_asan" if sanitize else BUILD
    checks = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment"] if sanitize else []
    debug = ["-g", "-fno-omit-frame-pointer"] if sanitize else []
    sources_dir = os.path.join(build, "src")
    os.makedirs(sources_dir, exist_ok=True)
    sources = []
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))) + [os.path.join(HERE, "selftest.cu")]:
        with open(cu) as f:
            text = rewrite_source(f.read())
        target = os.path.join(sources_dir, os.path.basename(cu)[:-3] + ".cpp")
        # rewritten only when changed, so ninja's timestamps see an unchanged source as unchanged
        previous = None
        if os.path.exists(target):
            with open(target) as f:
                previous = f.read()
        if previous != text:
            with open(target, "w") as f:
                f.write(text)
        sources.append(target)
    return cpp_extension.load(
        name=NAME + ("_asan" if sanitize else ""),
        sources=sources,
        extra_cflags=["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                      f"-DMASKEDSSL_MAX_GRID_Y={MAX_GRID_Y}", *debug, *checks, "-include",
                      os.path.join(HERE, "cuda_emu.h")],
        extra_ldflags=checks,
        extra_include_paths=[os.path.join(HERE, "include"), HERE, os.path.join(ROOT, "csrc")],
        build_directory=build,
        is_python_module=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    import maskedssl.ops._backend as backend

    if not backend.cuda_extension_loaded():
        raise SystemExit("maskedssl._C is not built (`make build`): the emulated kernels need its schemas")
    print(build_and_load(verbose=True))
