"""Build CUDA C source into a shared library for the emulator, and read its kernel signatures.

The source is the same code string CuPy's RawModule gets. Two mechanical rewrites only:
`extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory (C++ has no
such declaration), and one generated thunk per kernel unpacks CUDA-style `void** args` (a pointer
to each argument's value, as cuLaunchKernel takes them) into a call of the kernel.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli") / "cuda_emu"
FLAGS = {
    "O2": ["-O2"],
    # ASan/UBSan: fatal on the first report, so the subprocess exit code carries the verdict.
    # -g1 (functions and line tables) builds 3x faster than -g and reports still name file:line.
    "asan": ["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}
_COMMON = ["-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing", "-w"]

_DYN_SHARED = re.compile(r"extern\s+__shared__\s+((?:__align__\(\d+\)\s*)?)([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
_KERNEL = re.compile(r'extern\s+"C"\s+__attribute__\(\(visibility\("default"\)\)\)\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{')


@dataclass(frozen=True)
class Param:
    ctype: str  # as written, e.g. "const uint8_t * __restrict"
    name: str

    @property
    def is_pointer(self) -> bool:
        return "*" in self.ctype

    @property
    def base(self) -> str:
        """The type without qualifiers and stars: "uint8_t", "float", "unsigned int"."""
        words = re.sub(r"[*&]", " ", self.ctype).replace("cuda::std::", "").split()
        words = [w for w in words if w not in ("const", "volatile", "__restrict", "__restrict__")]
        return " ".join(words)


def rewrite(code: str) -> str:
    return _DYN_SHARED.sub(lambda m: f"{m[2]}* {m[3]} = ({m[2]}*)::emu::dyn_smem();", code)


def includes(options: tuple[str, ...]) -> list[str]:
    return [o for o in options if o.startswith("-I")]


def _gxx(args: list[str], cwd: Path) -> str:
    # never the compiler under a preloaded sanitizer runtime (the ASan test process has one)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run(["g++", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"g++ failed for the emulator build:\n{proc.stderr[-4000:]}")
    return proc.stdout


def _split_params(text: str) -> list[Param]:
    params = []
    for p in (s.strip() for s in text.split(",")):
        if not p or p == "void":
            continue
        m = re.match(r"(.*?)(\w+)\s*$", p, re.S)
        params.append(Param(" ".join(m[1].split()), m[2]))
    return params


def signatures(src: Path, options: tuple[str, ...]) -> dict[str, list[Param]]:
    """extern "C" kernels of the preprocessed source: macros that stamp out kernels are expanded."""
    pre = _gxx(["-E", "-P", "-x", "c++", "-std=c++17", f"-I{HERE / 'include'}", "-include", str(HERE / "emu.h"),
                *includes(options), str(src)], src.parent)
    return {m[1]: _split_params(m[2]) for m in _KERNEL.finditer(pre)}


def _thunks(sigs: dict[str, list[Param]]) -> str:
    out = []
    for name, params in sigs.items():
        call = ", ".join(f"*({p.ctype}*)a[{i}]" for i, p in enumerate(params))
        out.append(f'extern "C" __attribute__((visibility("default"))) void __emu_thunk_{name}(void** a) '
                   f"{{ {name}({call}); }}")
    return "\n".join(out) + "\n"


def _key(code: str, options: tuple[str, ...], variant: str) -> str:
    h = hashlib.sha256()
    for part in (code, " ".join(options), variant, " ".join(FLAGS[variant])):
        h.update(part.encode() + b"\0")
    for f in sorted(HERE.rglob("*")):  # what goes into a build: headers, runtime, this file
        if f.is_file() and (f.suffix in ("", ".h", ".cpp") or f.name == "build.py"):
            h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _compile(args: list[str], out: Path, target: Path) -> None:
    """g++ into a temporary name, then an atomic rename: a concurrent or killed build never
    leaves a half-written file under the final name."""
    with tempfile.NamedTemporaryFile(dir=out, suffix=target.suffix, delete=False) as tmp:
        pass
    _gxx([*args, "-o", tmp.name], out)
    os.replace(tmp.name, target)


def _runtime(variant: str) -> Path:
    """The scheduler compiled once per variant (it is the same for every kernel source)."""
    out = CACHE / _key("", (), variant)
    obj = out / "runtime.o"
    if not obj.exists():
        out.mkdir(parents=True, exist_ok=True)
        _compile([*FLAGS[variant], *_COMMON, "-c", "-include", str(HERE / "emu.h"),
                  str(HERE / "runtime.cpp")], out, obj)
    return obj


def build(code: str, options: tuple[str, ...] = (), variant: str = "O2") -> tuple[Path, dict[str, list[Param]]]:
    """(shared library, kernel signatures), cached by a hash of everything that goes in."""
    out = CACHE / _key(code, options, variant)
    lib = out / "libkernels.so"
    sig_file = out / "signatures.json"
    if lib.exists() and sig_file.exists():
        sigs = json.loads(sig_file.read_text())
        return lib, {name: [Param(*p) for p in params] for name, params in sigs.items()}
    runtime = _runtime(variant)
    # Sources go to a private directory, so concurrent test processes never compile each
    # other's half-written files; the products are renamed into place, the library last.
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        (work / "kern.cu").write_text(rewrite(code))
        sigs = signatures(work / "kern.cu", options)
        (work / "signatures.json").write_text(json.dumps({n: [[p.ctype, p.name] for p in ps] for n, ps in sigs.items()}))
        (work / "thunks.cpp").write_text(f'#include "kern.cu"\n{_thunks(sigs)}')
        _gxx([*FLAGS[variant], *_COMMON, f"-I{HERE / 'include'}", "-include", str(HERE / "emu.h"), *includes(options),
              "-x", "c++", "thunks.cpp", "-x", "none", str(runtime), "-o", "libkernels.so"], work)
        out.mkdir(parents=True, exist_ok=True)
        os.replace(work / "signatures.json", sig_file)
        os.replace(work / "libkernels.so", lib)
    return lib, sigs
