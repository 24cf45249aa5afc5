"""The CPU kernels of csrc/*.c, built on first use with the system's C compiler.

`cc -O3 -march=native -fopenmp` into the cache directory, keyed by the source and the machine,
then loaded with ctypes. No compiler, or a failed build, means None: the torch path serves.

Arrays may be numpy arrays (the torch-free runtime, native_model.py) or torch tensors (the torch
models' NativeDecoder); this module never imports torch itself.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("qmatmul.c", "packed.c", "attention.c", "decoder.c", "lora.c", "floatmm.c", "quantize.c")]
HEADERS = [Path(__file__).with_name("csrc") / "attention.h"]  # part of the build's identity
TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS})
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})  # floatmm.c: f32 arithmetic on the file's values
K_TYPES = frozenset({Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS})  # rows must be whole 256-blocks
ACTS = {"silu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2}  # hidden_act -> qmm_opts.act
_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet
_THREADS: int | None = None
_DEFAULT_THREADS: int | None = None  # read once: OMP_NUM_THREADS, else the cores


def ptr(t) -> int:
    """The address of a numpy array's or a torch tensor's first element."""
    return t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr()


def _contiguous(t):
    return np.ascontiguousarray(t) if isinstance(t, np.ndarray) else t.contiguous()


def _row_stride(t) -> int:
    """Elements between rows."""
    return t.strides[0] // t.itemsize if isinstance(t, np.ndarray) else t.stride(0)


def set_threads(n: int) -> None:
    global _THREADS
    _THREADS = max(1, int(n))


def threads() -> int:
    """The kernels' thread count: set_threads(), else torch's when torch is loaded (tests and the
    torch models set it there), else OMP_NUM_THREADS, else the CPUs this process may run on."""
    if _THREADS is not None:
        return _THREADS
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    global _DEFAULT_THREADS
    if _DEFAULT_THREADS is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        _DEFAULT_THREADS = int(env) if env.isdigit() and int(env) > 0 else physical_cores()
    return _DEFAULT_THREADS


def physical_cores() -> int:
    """Cores (not hyper-threads) this process may run on, as torch and llama.cpp default to:
    a second thread per core only contends for the same vector units."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def _cache_dir() -> Path:
    root = os.environ.get("MISTRALRS_CLI_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mistralrs-cli") / "native"


def _cpu_flags() -> bytes:
    """-march=native code is only valid on a CPU with the same features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()


def build(extra_flags: tuple[str, ...] = (), cache: Path | None = None) -> ctypes.CDLL | None:
    """Compile (once per source, machine and flags) and load; None without a working compiler.
    Tests pass extra_flags=("-mno-avx2",) to exercise the portable scalar path."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or os.environ.get("MISTRALRS_CLI_NO_NATIVE"):
        return None
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    ident = src + platform.machine().encode() + _cpu_flags() + " ".join(extra_flags).encode()
    lib = (cache or _cache_dir()) / f"qmatmul-{hashlib.sha256(ident).hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            cmd = [cc, "-O3", "-march=native", *extra_flags, "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                   *map(str, SOURCES), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log.info("native CPU kernels not built (%s); using torch", proc.stderr.strip()[:200])
                return None
            out.replace(lib)  # atomic: concurrent builds never load a half-written file
    if "OMP_WAIT_POLICY" not in os.environ:
        # libgomp reads this when it loads (here, unless torch loaded it first). Its default lets
        # an idle thread spin ~300k pauses (several ms) before sleeping: when the CPUs are shared
        # (the server's HTTP thread, its clients, other processes) the spinning thread takes the
        # core its partner needs to reach the barrier, and a decode step took 20x longer here.
        # ~10k pauses (~0.5 ms) still outlast the gaps between a token's kernel calls.
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    so = ctypes.CDLL(str(lib))
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    so.qmm.restype = so.qmm_parts.restype = i32
    so.qmm.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr, i64, i32]
    so.qmm_parts.argtypes = [ptr, i32, i64, ptr, i64, i64, ptr, i64, i32, ptr]
    so.repack8.restype = so.packed_supported.restype = so.packed_block_bytes.restype = i32
    so.repack8.argtypes = so.repack8_k.argtypes = [i32, ptr, i64, i64, ptr]
    so.repack8_k.restype = so.packed_k_block_bytes.restype = i32
    so.packed_k_block_bytes.argtypes = [i32]
    so.packed_supported.argtypes = so.packed_block_bytes.argtypes = [i32]
    so.packed_wide.restype, so.packed_wide.argtypes = i32, [i32]  # packed Q8_0 takes 16-bit activations
    so.rope_rows.restype = so.attn_batch.restype = None
    so.rope_rows.argtypes = [ptr, i64, i64, i32, i32, i32, i32, ptr, ptr, ptr, ptr, f32]
    so.attn_batch.argtypes = [ptr, i32, i64, i64, i32, i32, i32, i64, f32, f32, i32, i32]
    so.kv_store.restype = None
    so.kv_store.argtypes = [ptr, i32, i64, i32, i32, i32, i32]
    so.repack_jobs.restype = i32
    so.repack_jobs.argtypes = [ptr, i32, i32]
    so.native_prof.restype, so.native_prof.argtypes = i32, [ptr, i32]  # timers, in a -DNATIVE_PROF build
    so.decoder_layers.restype = i32
    so.decoder_layers.argtypes = [ptr, i32, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, i32, i32, i64,
                                  i32, i32]
    so.quantize_rows.restype = i32  # csrc/quantize.c: --isq's Q8_0, Q4_K, Q5_K, Q6_K
    so.quantize_rows.argtypes = [i32, ptr, i64, i64, ptr, i32]
    return so


class QPart(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("rows", ctypes.c_int64), ("w", ctypes.c_void_p)]


class AttnSeq(ctypes.Structure):
    """One sequence of an attn_batch call (csrc/attention.c); pointers are data_ptr()s."""
    _fields_ = [("q", ctypes.c_void_p), ("n", ctypes.c_int64), ("out", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("S", ctypes.c_int64), ("sh", ctypes.c_int64),
                ("ss", ctypes.c_int64), ("span_end", ctypes.c_void_p)]


class DecLayer(ctypes.Structure):
    """One layer of a decoder_layers call (csrc/decoder.c); pointers are addresses."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("qkv", "qkv_opts", "o", "o_opts", "gu", "gu_opts", "down",
                                                     "down_opts")] + \
               [(name, ctypes.c_int) for name in ("qkv_n", "o_n", "gu_n", "down_n")] + \
               [("cos_t", ctypes.c_void_p), ("sin_t", ctypes.c_void_p), ("rot", ctypes.c_int),
                ("qn", ctypes.c_void_p), ("kn", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("window", ctypes.c_int64)]


class QmmOpts(ctypes.Structure):
    """What qmm_parts fuses around the multiply (see csrc/qmatmul.c); pointers are data_ptr()s."""
    _fields_ = [("norm_w", ctypes.c_void_p), ("norm_eps", ctypes.c_float), ("act", ctypes.c_int),
                ("bias", ctypes.c_void_p), ("residual", ctypes.c_void_p), ("ld_res", ctypes.c_int64),
                ("post_w", ctypes.c_void_p), ("post_eps", ctypes.c_float), ("precise", ctypes.c_int),
                ("lora", ctypes.c_void_p)]  # a native_lora.LoraPlan's address, or None


def qmm_opts(norm=None, eps=0.0, act=0, bias=None, post=None, post_eps=0.0, precise=False) -> QmmOpts:
    """QmmOpts over arrays or tensors (None: that step is skipped); the residual is set per call.
    precise: activations rounded in two 8-bit parts (~16 bits) instead of one ("fast", the
    rounding llama.cpp's CPU kernels use); a packed Q8_0 weight in a build without VNNI takes
    them rounded once to 16 bits instead (csrc/packed.c's packed_rows_w)."""
    p = lambda t: None if t is None else ptr(t)  # noqa: E731
    return QmmOpts(norm_w=p(norm), norm_eps=eps, act=act, bias=p(bias), residual=None, ld_res=0, post_w=p(post),
                   post_eps=post_eps, precise=int(precise))


PACKED = 0x100  # QPart.type flag: the weight is in packed.c's 8-row groups


class _Arena:
    """Packed weights live in big anonymous mappings with transparent huge pages requested:
    2 MB pages cut the TLB misses of streaming every weight once per token (measured on an AVX2
    VM: 25-30% more read bandwidth; on this project's AVX-512 VM Gemma-3's 178 MB output matrix
    multiplied 7% faster from huge pages). They are requested after the repack has written a
    chunk (settle()), not before: a huge page's first write cost ~4x a 4 KB page's here (a 2 MB
    block of a VM's memory comes back from the host; 178 MB: 0.5 s of system time against 0.06 s),
    and that was most of the repack, the last step before a one-shot's first token (Gemma-3's
    time to first token from start 0.83 -> 0.73 s, SmolLM2's 0.80 -> 0.67 s, bench.py medians;
    decode unchanged within its noise). The kernel's khugepaged collapses chunks marked after
    the fact in the background, at its default pace (~16 MB every 10 s measured here: a server's
    weights are on huge pages within minutes, a one-shot's mostly not). A chunk is unmapped when
    no tensor uses it any more."""

    CHUNK = 64 << 20

    def __init__(self):
        self.buf: np.ndarray | None = None
        self.used = 0
        self.lock = threading.Lock()  # plans may be prepared on several threads
        self.fresh: list[mmap.mmap] = []  # chunks mapped since the last settle()

    def alloc(self, nbytes: int) -> np.ndarray:
        with self.lock:
            return self._alloc((nbytes + 63) & ~63)

    def _alloc(self, nbytes: int) -> np.ndarray:
        if self.buf is None or self.used + nbytes > self.buf.size:
            size = max(self.CHUNK, nbytes)
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would be shmem: no THP
            self.fresh.append(mm)
            self.buf, self.used = np.frombuffer(mm, dtype=np.uint8), 0
        out = self.buf[self.used:self.used + nbytes]
        self.used += nbytes
        return out

    def settle(self) -> None:
        """The chunks mapped since the last call have been written: huge pages from now on."""
        with self.lock:
            fresh, self.fresh = self.fresh, []
        if hasattr(mmap, "MADV_HUGEPAGE"):
            for mm in fresh:
                mm.madvise(mmap.MADV_HUGEPAGE)


_ARENA = _Arena()


def _repacker(lib: ctypes.CDLL, code: int) -> tuple[int, int] | None:
    """(1 for repack8_k else 0, bytes per 8-row group per block) when packed.c repacks this type."""
    if lib.packed_supported(code):
        return 0, lib.packed_block_bytes(code)
    if lib.packed_k_block_bytes(code):
        return 1, lib.packed_k_block_bytes(code)
    return None


class RepackJob(ctypes.Structure):
    """One slice of a repack_jobs call (csrc/packed.c)."""
    _fields_ = [("k_kind", ctypes.c_int), ("type", ctypes.c_int), ("w", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("out", ctypes.c_void_p), ("wbytes", ctypes.c_int64),
                ("release", ctypes.c_int), ("rc", ctypes.c_int)]


class Plan:
    """A weight's parts as the kernel takes them: (raw rows, qtype, rows) each. Q4_0, Q4_1,
    Q5_0, Q8_0, Q4_K and Q6_K are repacked into 8-row groups (packed.c); other types are read
    in place from the file mapping. Keeps the tensors it points into alive."""

    def __init__(self, parts: list[tuple], lib: ctypes.CDLL | None = None):
        if not parts:  # Plan.join fills it in
            return
        singles = plans_at_once([(raw, qtype, rows, False) for raw, qtype, rows in parts], lib or library())
        self._fill([(p.tensors[0], p.array[0].type, p.array[0].rows) for p in singles])

    def _fill(self, prepared: list[tuple]) -> None:
        """(array, kernel type code, rows) per part."""
        self.tensors = [t for t, _, _ in prepared]
        self.array = (QPart * len(prepared))(*(QPart(code, rows, ptr(t)) for t, code, rows in prepared))
        self.count = len(prepared)
        self.rows = sum(rows for _, _, rows in prepared)

    @classmethod
    def join(cls, plans: list["Plan"]) -> "Plan":
        """Several prepared plans stacked by rows, sharing their (already repacked) tensors."""
        out = cls([])
        out.tensors = [t for p in plans for t in p.tensors]
        entries = [e for p in plans for e in p.array]
        out.array = (QPart * len(entries))(*(QPart(e.type, e.rows, e.w) for e in entries))
        out.count, out.rows = len(entries), sum(p.rows for p in plans)
        return out


def plans_at_once(parts: list[tuple], lib: ctypes.CDLL, n_threads: int | None = None) -> list[Plan]:
    """One single-part Plan per (raw rows, qtype, rows, from_file), every repack in one C call
    (repack_jobs) that does not hold Python's lock. A from_file slice's pages of the file mapping
    are dropped once it is repacked (never pass a heap array as from_file)."""
    slots, jobs = [], []
    for raw, qtype, rows, from_file in parts:
        t, code = _contiguous(raw), int(qtype)
        block, size = GGML_QUANT_SIZES[qtype]
        k = t.shape[1] // size * block
        how = _repacker(lib, code)
        if how is None:
            slots.append((t, code, rows, None))
            continue
        packed = _ARENA.alloc((rows + 7) // 8 * (k // block) * how[1])
        slots.append((t, code, rows, (packed, len(jobs))))
        jobs.append(RepackJob(how[0], code, ptr(t), rows, k, ptr(packed), t.nbytes, int(from_file), 0))
    arr = (RepackJob * len(jobs))(*jobs)
    lib.repack_jobs(arr, len(jobs), n_threads or threads())
    _ARENA.settle()
    plans = []
    for t, code, rows, job in slots:
        if job is not None and arr[job[1]].rc == 0:
            t, code = job[0], code | PACKED
        plan = Plan([])
        plan._fill([(t, code, rows)])
        plans.append(plan)
    return plans


def library() -> ctypes.CDLL | None:
    global _LIB
    if _LIB is False:
        try:
            # MISTRALRS_CLI_NATIVE_PROF=1: a build with the kernels' timers (scripts/decode_budget.py)
            _LIB = build(("-DNATIVE_PROF",) if os.environ.get("MISTRALRS_CLI_NATIVE_PROF") else ())
        except OSError as e:
            log.info("native CPU kernels unavailable (%s); using torch", e)
            _LIB = None
    return _LIB


def qmatmul(x, parts, lib: ctypes.CDLL | None = None, opts: QmmOpts | None = None, out=None, n_threads=None):
    """x (M, K) f32 times the stacked weights (a Plan, or [(raw rows, qtype, rows)]) -> (M, sum
    rows) f32, a numpy array or a torch tensor as x is; `opts` fuses a norm / activation before
    and bias / norm + residual add after."""
    lib = lib or library()
    plan = parts if isinstance(parts, Plan) else Plan(parts, lib)
    is_np = isinstance(x, np.ndarray)
    if (x.strides[-1] != x.itemsize) if is_np else (x.stride(-1) != 1):
        x = _contiguous(x)
    m = x.shape[0]
    k = x.shape[1] // 2 if opts is not None and opts.act else x.shape[1]
    if out is not None:
        y = out
    elif is_np:
        y = np.empty((m, plan.rows), dtype=np.float32)
    else:
        y = x.new_empty(m, plan.rows)
    rc = lib.qmm_parts(plan.array, plan.count, k, ptr(x), _row_stride(x), m, ptr(y), _row_stride(y),
                       n_threads or threads(), None if opts is None else ctypes.byref(opts))
    if rc != 0:
        raise RuntimeError(f"native qmm refused the call (types {[p.type for p in plan.array]}, K={k})")
    return y
