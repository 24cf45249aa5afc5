"""Paged KV cache: a fixed pool of blocks per layer, block tables per sequence, a prefix cache.

Each layer's pool is head-major, (Hkv, n_blocks * block_size, D). A sequence owns a list of
block ids; `PagedSeqCache.update` keeps the model's KVCache protocol (append (T, Hkv, D), get
back all keys/values as (Hkv, S, D)). The allocator places a sequence's blocks next to each other
whenever it can, so the returned keys/values are a view of the pool (as fast as a contiguous
cache); only a fragmented sequence pays for a gather.

Prefix cache: a full block is named by hash(parent block's hash, its token ids). Finished
sequences leave their full blocks behind as cache entries (the `prefix_cache_n` newest ones);
a later prompt that starts with the same blocks reuses them (reference counts). Under memory
pressure the oldest entry is dropped first (LRU).

The pools are torch tensors for the torch models and numpy arrays for the native runtime
(PoolShape.dtype says which); only the copies below differ, the block bookkeeping is shared.
"""
from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np


def empty(shape: tuple[int, ...], dtype: Any):
    """An uninitialized buffer: numpy for a numpy dtype, else torch (imported only then).

    numpy buffers come from an anonymous mapping with huge pages refused: numpy's own allocator
    asks for 2 MB pages, and a pool written a few rows per head would then hold a whole huge page
    per head per layer (hundreds of MB resident for a short chat)."""
    if isinstance(dtype, np.dtype):
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    import torch

    return torch.empty(shape, dtype=dtype)


@dataclass
class PoolShape:
    n_layers: int
    n_kv: int
    head_dim: int
    dtype: Any  # torch.dtype, or np.dtype for numpy pools

    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * self.dtype.itemsize


class BlockAllocator:
    """Block ids, reference counts and the prefix cache's hash table; pure Python."""

    def __init__(self, n_blocks: int, prefix_cache_n: int = 0):
        self.n_blocks = n_blocks
        self.free: set[int] = set(range(n_blocks))
        self.refs = [0] * n_blocks
        self.hash_of: dict[int, int] = {}  # block -> hash (full, registered blocks)
        self.by_hash: dict[int, int] = {}  # hash -> block
        self.entries: deque[list[int]] = deque()  # finished sequences' full blocks, oldest first
        self.prefix_cache_n = prefix_cache_n
        self.hits = 0  # prompt blocks found in the prefix cache

    # ---- allocation ----
    def allocate(self, after: int | None) -> int | None:
        """A free block, preferably `after + 1` (keeps a sequence contiguous); None if full."""
        if not self.free:
            while self.entries and not self.free:
                self._drop_entry()
            if not self.free:
                return None
        if after is not None and after + 1 in self.free:
            block = after + 1
        else:
            block = self._roomy_start()
        self.free.discard(block)
        self.refs[block] = 1
        return block

    def _roomy_start(self) -> int:
        """The start of a new run: inside the largest free gap, leaving the block before it
        room to grow when that block belongs to a live sequence."""
        best, start, run = (0, 0), None, 0
        for b in range(self.n_blocks + 1):
            if b < self.n_blocks and b in self.free:
                start = b if run == 0 else start
                run += 1
                continue
            if run > best[0]:
                best = (run, start)
            run = 0
        length, start = best
        if start > 0 and self.refs[start - 1] > 0 and length > 1:
            return start + length // 2
        return start

    def incref(self, block: int) -> None:
        self.refs[block] += 1

    def decref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            h = self.hash_of.pop(block, None)
            if h is not None and self.by_hash.get(h) == block:
                del self.by_hash[h]
            self.free.add(block)

    # ---- prefix cache ----
    def register(self, block: int, h: int) -> None:
        if self.prefix_cache_n and h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def lookup(self, hashes: list[int]) -> list[int]:
        """The cached blocks for the longest run of `hashes` from the start (increfed)."""
        found = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            self.incref(b)
            found.append(b)
        self.hits += len(found)
        return found

    def retain(self, blocks: list[int]) -> None:
        """Keep a finished sequence's full, registered blocks as a prefix-cache entry."""
        blocks = [b for b in blocks if b in self.hash_of]
        if not self.prefix_cache_n or not blocks:
            return
        for old in [e for e in self.entries if e == blocks[: len(e)]]:  # now redundant
            self.entries.remove(old)
            for b in old:
                self.decref(b)
        for b in blocks:
            self.incref(b)
        self.entries.append(blocks)
        while len(self.entries) > self.prefix_cache_n:
            self._drop_entry()

    def _drop_entry(self) -> None:
        for b in self.entries.popleft():
            self.decref(b)

    def forget(self) -> None:
        """Empty the prefix cache (the weights changed: cached keys/values are stale)."""
        while self.entries:
            self._drop_entry()
        self.by_hash.clear()
        self.hash_of.clear()

    # ---- accounting ----
    def n_free(self) -> int:
        return len(self.free)

    def held_by_sequences(self) -> int:
        """Blocks referenced by something other than prefix-cache entries (0 when idle)."""
        by_entries = [0] * self.n_blocks
        for e in self.entries:
            for b in e:
                by_entries[b] += 1
        return sum(1 for b in range(self.n_blocks) if self.refs[b] > by_entries[b])


def block_hashes(tokens: list[int], block_size: int, n_blocks: int, salt: Any = None) -> list[int]:
    """Chained block hashes; `salt` separates sequences whose keys/values differ for the same
    tokens (other LoRA adapters, X-LoRA): the first block's parent."""
    out, parent = [], salt
    for i in range(n_blocks):
        parent = hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


class PagedKV:
    """The block pool (per layer, head-major) and its allocator: one per engine."""

    def __init__(self, shape: PoolShape, n_blocks: int, block_size: int, prefix_cache_n: int = 0,
                 round_to: Any = None):
        self.shape, self.block_size, self.round_to = shape, block_size, round_to
        slots = n_blocks * block_size
        # one tensor per layer, keys' heads then values' heads: when k and v arrive as adjacent
        # columns of one qkv row (the native decoder), one op rounds and stores both
        self.kv = [empty((2 * shape.n_kv, slots, shape.head_dim), shape.dtype) for _ in range(shape.n_layers)]
        self.addresses = [t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr() for t in self.kv]
        self.itemsize = shape.dtype.itemsize
        self.address_array = np.asarray(self.addresses, dtype=np.int64)
        self.k = [t[: shape.n_kv] for t in self.kv]
        self.v = [t[shape.n_kv:] for t in self.kv]
        self.alloc = BlockAllocator(n_blocks, prefix_cache_n)
        # prompt tokens always computed, even when cached: at least the last (its logits are
        # needed); more when the model computes short chunks with other kernels than whole
        # prompts, so that a cached prompt's tail takes the same arithmetic as the whole prompt
        self.min_tail = 1
        self.on_copy = None  # --tp: rank 0 passes these copies on to the other ranks (distributed/step.py)

    @property
    def capacity_tokens(self) -> int:
        return self.alloc.n_blocks * self.block_size

    def new_sequence(self, tokens: list[int], salt: Any = None) -> "PagedSeqCache":
        """A cache for a sequence; its first blocks come from the prefix cache when they can,
        all but the last `min_tail` tokens. Only blocks of sequences with the same `salt` match."""
        cache = PagedSeqCache(self)
        cache.salt = salt
        if self.alloc.prefix_cache_n:
            n = max(0, len(tokens) - self.min_tail) // self.block_size
            cache.hashes = block_hashes(tokens, self.block_size, n, salt)
            cache.blocks = self._contiguous_copy(self.alloc.lookup(cache.hashes))
            cache.hashes = cache.hashes[: len(cache.blocks)]
            cache.set_length(len(cache.blocks) * self.block_size)
        return cache

    def _contiguous_copy(self, found: list[int]) -> list[int]:
        """Shared prefix blocks the sequence could not grow after (the next block is taken) would
        make every decode step gather; copying them once into a fresh run keeps its keys a view
        of the pool. Falls back to sharing when no such run is free."""
        alloc = self.alloc
        if not found or (all(y == x + 1 for x, y in zip(found, found[1:])) and found[-1] + 1 in alloc.free):
            return found
        fresh: list[int] = []
        for _ in found:
            b = alloc.allocate(fresh[-1] if fresh else None)
            if b is None or (fresh and b != fresh[-1] + 1):
                for x in fresh + ([b] if b is not None else []):
                    alloc.decref(x)
                return found
            fresh.append(b)
        bs = self.block_size
        src = [b * bs + j for b in found for j in range(bs)]
        s0, n = fresh[0] * bs, len(found) * bs
        for pool in self.kv:
            pool[:, s0:s0 + n] = pool[:, src]
        for b in found:
            alloc.decref(b)
        if self.on_copy is not None:
            self.on_copy(found, fresh)
        return fresh


def _adjacent(k, v):
    """k and v as one (T, 2 Hkv, D) view when v's heads directly follow k's in memory."""
    if k.stride() != v.stride() or k.dtype != v.dtype or k.stride(2) != 1 or k.stride(1) != k.shape[2]:
        return None
    if v.data_ptr() != k.data_ptr() + k.shape[1] * k.stride(1) * k.element_size():
        return None
    return k.as_strided((k.shape[0], 2 * k.shape[1], k.shape[2]), k.stride())


class PagedSeqCache:
    """One sequence's view of the pool: the KVCache protocol over its block table."""

    def __init__(self, kv: PagedKV):
        self.kv = kv
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # hashes of the leading full blocks, registered
        self.salt: Any = None  # the first block's parent hash (PagedKV.new_sequence)
        self.lengths = [0] * kv.shape.n_layers
        self._slots = None  # the slot index of each position, built when a gather needs it
        self._contig, self._contig_checked = True, 0

    def __len__(self) -> int:
        return self.lengths[0]

    def set_length(self, n: int) -> None:
        self.lengths = [n] * len(self.lengths)

    @property
    def contiguous(self) -> bool:
        """Blocks b, b+1, b+2, ...: the keys/values are one slice of the pool."""
        b = self.blocks
        if self._contig_checked != len(b):
            self._contig = all(y == x + 1 for x, y in zip(b, b[1:]))
            self._contig_checked = len(b)
        return self._contig

    def reserve(self, n_tokens: int) -> bool:
        """Blocks for `n_tokens` in all; False (and nothing changed beyond what fits) if the pool
        is full."""
        bs = self.kv.block_size
        while len(self.blocks) * bs < n_tokens:
            block = self.kv.alloc.allocate(self.blocks[-1] if self.blocks else None)
            if block is None:
                return False
            self.blocks.append(block)
            self._slots = None
        return True

    def slots(self, n: int):
        """Pool slots of positions [0, n): a torch LongTensor or a numpy int64 array, as the pool."""
        bs = self.kv.block_size
        if self._slots is None or len(self._slots) < len(self.blocks) * bs:
            base = np.asarray(self.blocks, dtype=np.int64)[:, None] * bs
            slots = (base + np.arange(bs, dtype=np.int64)[None, :]).reshape(-1)
            if not isinstance(self.kv.kv[0], np.ndarray):
                import torch

                slots = torch.from_numpy(slots)
            self._slots = slots
        return self._slots[:n]

    def update(self, layer: int, k, v):
        """Append k, v (T, Hkv, D); return all keys and values so far, (Hkv, S, D)."""
        if isinstance(k, np.ndarray):
            return self._update_np(layer, k, v)
        import torch

        n, t = self.lengths[layer], k.shape[0]
        pool, h, rnd = self.kv.kv[layer], k.shape[1], self.kv.round_to
        self.lengths[layer] = n + t
        both = _adjacent(k, v)  # (T, 2 Hkv, D) over k and v, or None
        new = both.transpose(0, 1) if both is not None else torch.cat([k, v], 1).transpose(0, 1)
        if rnd is not None:
            new = new.to(rnd)
        if self.contiguous:
            s0 = self.blocks[0] * self.kv.block_size
            pool[:, s0 + n:s0 + n + t] = new
            return pool[:h, s0:s0 + n + t], pool[h:, s0:s0 + n + t]
        idx = self.slots(n + t)
        pool.index_copy_(1, idx[n:], new.to(pool.dtype))
        out = pool.index_select(1, idx)
        return out[:h], out[h:]

    def native_slots(self, layer: int, t: int) -> tuple[int, int, int, int, int] | None:
        """For the native runtime: make room for t more positions of `layer` and return where the
        whole (Hkv, S, D) keys and values are, (k address, v address, S, head stride, slot
        stride) in elements, for its kernels to write the new rows and read them all; None when
        the blocks are not one slice of the pool (then update() gathers them)."""
        if not self.contiguous:
            return None
        kv = self.kv
        n = self.lengths[layer]
        self.lengths[layer] = n + t
        base, slots, d = kv.addresses[layer], kv.kv[layer].shape[1], kv.shape.head_dim
        k = base + self.blocks[0] * kv.block_size * d * kv.itemsize
        return k, k + kv.shape.n_kv * slots * d * kv.itemsize, n + t, slots * d, d

    @property
    def dtype(self):
        return self.kv.shape.dtype

    def native_layers_ok(self) -> bool:
        return self.contiguous

    def native_layers(self, t: int):
        """native_slots for every layer at once: (k addresses, v addresses) as int64 arrays over
        the layers, then S, head stride, slot stride; None when the blocks are not one slice."""
        if not self.contiguous:
            return None
        kv = self.kv
        n = self.lengths[0]
        self.set_length(n + t)
        slots, d = kv.kv[0].shape[1], kv.shape.head_dim
        k = kv.address_array + self.blocks[0] * kv.block_size * d * kv.itemsize
        return k, k + kv.shape.n_kv * slots * d * kv.itemsize, n + t, slots * d, d

    def _update_np(self, layer: int, k: np.ndarray, v: np.ndarray):
        n, t = self.lengths[layer], k.shape[0]
        pool, h, rnd = self.kv.kv[layer], k.shape[1], self.kv.round_to
        self.lengths[layer] = n + t
        new = np.concatenate([k, v], axis=1).transpose(1, 0, 2)  # (2 Hkv, T, D)
        if rnd is not None:
            new = new.astype(rnd)  # stored back as the pool's dtype: rounded through rnd
        if self.contiguous:
            s0 = self.blocks[0] * self.kv.block_size
            pool[:, s0 + n:s0 + n + t] = new
            return pool[:h, s0:s0 + n + t], pool[h:, s0:s0 + n + t]
        idx = self.slots(n + t)
        pool[:, idx[n:]] = new
        out = pool[:, idx]
        return out[:h], out[h:]

    def commit(self, tokens: list[int]) -> None:
        """After a step: register the blocks that became full (tokens: the sequence so far)."""
        alloc, bs = self.kv.alloc, self.kv.block_size
        if not alloc.prefix_cache_n:
            return
        for i in range(len(self.hashes), len(self) // bs):
            parent = self.hashes[-1] if self.hashes else self.salt
            h = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            self.hashes.append(h)
            alloc.register(self.blocks[i], h)

    def release(self, keep_prefix: bool) -> None:
        """Give the blocks back; a finished sequence leaves its full blocks in the prefix cache."""
        if keep_prefix:
            self.kv.alloc.retain(self.blocks[: len(self.hashes)])
        for b in self.blocks:
            self.kv.alloc.decref(b)
        self.blocks, self.hashes = [], []
        self._contig_checked = -1
        self.set_length(0)
        self._slots = None
