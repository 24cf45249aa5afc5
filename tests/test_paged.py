"""The paged KV cache against the contiguous one (the reference), the allocator's placement,
reference counts, prefix-cache hashing and LRU eviction."""
from __future__ import annotations

import torch

from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.engine.paged import BlockAllocator, PagedKV, PoolShape, block_hashes

SHAPE = PoolShape(n_layers=2, n_kv=2, head_dim=4, dtype=torch.float32)


def _kv(n_blocks=20, block_size=4, prefix_cache_n=0) -> PagedKV:
    return PagedKV(SHAPE, n_blocks, block_size, prefix_cache_n)


def _append_both(paged, ref, t: int, gen: torch.Generator):
    for layer in range(SHAPE.n_layers):
        k, v = torch.randn(t, 2, 4, generator=gen), torch.randn(t, 2, 4, generator=gen)
        got, want = paged.update(layer, k, v), ref.update(layer, k, v)
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.equal(g, w)


def test_paged_equals_contiguous_when_fragmented():
    kv, gen = _kv(), torch.Generator().manual_seed(0)
    a, b = kv.new_sequence([1, 2, 3]), kv.new_sequence([4, 5, 6])
    ra, rb = SeqKVCache(2, 2, 4, capacity=2), SeqKVCache(2, 2, 4, capacity=2)
    for t in (3, 1, 1, 6, 1, 5, 1):  # interleaved growth: a outgrows the room left before b
        for seq, ref, grow in ((a, ra, 3 * t), (b, rb, t)):
            assert seq.reserve(len(seq) + grow)
            _append_both(seq, ref, grow, gen)
    assert not a.contiguous  # the gather path ran
    assert len(a) == len(ra) == 54 and len(b) == len(rb) == 18


def test_a_lone_sequence_stays_contiguous_and_returns_views():
    kv, gen = _kv(), torch.Generator().manual_seed(1)
    seq, ref = kv.new_sequence([1]), SeqKVCache(2, 2, 4)
    for t in (5, 1, 1, 1, 9, 1):
        assert seq.reserve(len(seq) + t)
        _append_both(seq, ref, t, gen)
    assert seq.contiguous
    k, _ = seq.update(0, torch.zeros(0, 2, 4), torch.zeros(0, 2, 4))
    assert k.data_ptr() >= kv.k[0].data_ptr()  # a view into the pool, no copy
    assert k.untyped_storage().data_ptr() == kv.k[0].untyped_storage().data_ptr()


def test_second_sequence_leaves_room_for_the_first_to_grow():
    alloc = BlockAllocator(16)
    first = alloc.allocate(None)
    second = alloc.allocate(None)
    assert first == 0 and second > 1
    assert alloc.allocate(first) == first + 1


def test_pool_full_then_freed():
    kv = _kv(n_blocks=4)
    seq = kv.new_sequence([1])
    assert seq.reserve(16) and not seq.reserve(17)
    assert kv.alloc.n_free() == 0
    seq.release(keep_prefix=False)
    assert kv.alloc.n_free() == 4 and kv.alloc.held_by_sequences() == 0


def test_prefix_blocks_are_shared_and_ref_counted():
    kv, gen = _kv(prefix_cache_n=4), torch.Generator().manual_seed(2)
    prompt = list(range(10, 21))  # 11 tokens: 2 full blocks of 4, then 3
    a = kv.new_sequence(prompt)
    assert a.reserve(len(prompt))
    _append_both(a, SeqKVCache(2, 2, 4), len(prompt), gen)
    a.commit(prompt)
    shared = a.blocks[:2]
    a.release(keep_prefix=True)
    assert kv.alloc.held_by_sequences() == 0 and kv.alloc.refs[shared[0]] == 1  # held by the cache
    b = kv.new_sequence(prompt)  # the blocks after the cached ones are free: shared, not copied
    assert b.blocks == shared and len(b) == 8 and kv.alloc.hits == 2
    assert kv.alloc.refs[shared[0]] == 2
    c = kv.new_sequence(prompt[:9] + [99, 98])  # shares the first two blocks only
    assert len(c) == 8 and kv.alloc.hits == 4
    d = kv.new_sequence([7] + prompt[1:])  # differs in the first token: no hit
    assert len(d) == 0
    for seq in (b, c, d):
        seq.release(keep_prefix=True)
    assert kv.alloc.held_by_sequences() == 0


def test_the_last_prompt_token_is_always_computed():
    kv = _kv(prefix_cache_n=4)
    prompt = list(range(8))  # exactly two blocks
    a = kv.new_sequence(prompt)
    a.reserve(8)
    a.set_length(8)
    a.commit(prompt)
    a.release(keep_prefix=True)
    assert len(kv.new_sequence(prompt)) == 4  # one block reused, the second holds the last token


def test_block_hash_depends_on_the_whole_prefix():
    h1 = block_hashes([1, 2, 3, 4, 5, 6], 3, 2)
    h2 = block_hashes([9, 2, 3, 4, 5, 6], 3, 2)
    assert h1[0] != h2[0] and h1[1] != h2[1]  # same second block, different parent


def test_lru_entries_evicted_under_pressure_and_by_count():
    alloc = BlockAllocator(4, prefix_cache_n=2)
    entries = []
    for i in range(3):
        b = alloc.allocate(None)
        alloc.register(b, hash(("e", i)))
        alloc.retain([b])
        alloc.decref(b)
        entries.append(b)
    assert len(alloc.entries) == 2 and hash(("e", 0)) not in alloc.by_hash  # count limit: oldest out
    assert alloc.n_free() == 2
    got = [alloc.allocate(None) for _ in range(3)]  # the third needs an entry's block
    assert None not in got and len(alloc.entries) == 1 and hash(("e", 1)) not in alloc.by_hash
    assert alloc.allocate(None) is not None and alloc.allocate(None) is None


def test_a_prefix_hit_that_could_not_grow_is_copied_into_a_contiguous_run():
    kv, gen = _kv(prefix_cache_n=4), torch.Generator().manual_seed(3)
    prompt = list(range(30, 43))  # 13 tokens: 3 full blocks
    a, ref = kv.new_sequence(prompt), SeqKVCache(2, 2, 4)
    a.reserve(16)
    _append_both(a, ref, 13, gen)
    a.commit(prompt)
    b = kv.new_sequence(prompt)  # a still owns the block after the shared ones
    assert len(b) == 12 and b.blocks[0] not in a.blocks and b.contiguous
    assert kv.alloc.hits == 3
    for layer in range(2):  # the copy holds the same keys and values
        got = b.update(layer, torch.zeros(0, 2, 4), torch.zeros(0, 2, 4))
        assert torch.equal(got[0], ref.k[layer][:, :12]) and torch.equal(got[1], ref.v[layer][:, :12])
    b.release(keep_prefix=True)
    a.release(keep_prefix=True)
    assert kv.alloc.held_by_sequences() == 0


def test_pool_size_flags():
    from mistralrs_cli.engine.engine import pool_blocks
    from mistralrs_cli.types import EngineConfig

    per_block_mb = SHAPE.bytes_per_token() * 32 / 2**20
    assert pool_blocks(EngineConfig(kv_tokens=100), SHAPE, 4096) == 4  # --pa-ctxt-len: ceil(100 / 32)
    assert pool_blocks(EngineConfig(kv_mem_mb=10 * per_block_mb), SHAPE, 4096) == 10  # --pa-gpu-mem
    assert pool_blocks(EngineConfig(max_seqs=3), SHAPE, 100) == 3 * 4  # default: max_seqs full contexts
    half = pool_blocks(EngineConfig(kv_mem_fraction=0.5), SHAPE, 4096)
    assert half >= 2 * pool_blocks(EngineConfig(kv_mem_fraction=0.25), SHAPE, 4096) - 1


def test_engine_flags_are_checked():
    import pytest

    from mistralrs_cli.errors import UserError
    from mistralrs_cli.run import RunOptions, engine_config

    for field, value, flag in [("pa_gpu_mem_usage", 2.0, "--pa-gpu-mem-usage"), ("max_seqs", 0, "--max-seqs"),
                               ("pa_blk_size", 0, "--pa-blk-size"), ("prefix_cache_n", -1, "--prefix-cache-n")]:
        with pytest.raises(UserError, match=flag):
            engine_config(RunOptions(**{field: value}))
    cfg = engine_config(RunOptions(no_paged_attn=True, pa_blk_size=16, prefix_cache_n=0, pa_ctxt_len=512))
    assert (cfg.paged_attn, cfg.block_size, cfg.prefix_cache_n, cfg.kv_tokens) == (False, 16, 0, 512)


def test_adjacent_k_and_v_of_one_qkv_row_are_stored_in_one_op():
    kv, gen = _kv(), torch.Generator().manual_seed(4)
    seq, ref = kv.new_sequence([1]), SeqKVCache(2, 2, 4)
    for t in (5, 1, 1):
        assert seq.reserve(len(seq) + t)
        for layer in range(2):
            qkv = torch.randn(t, 4 + 2 + 2, 4, generator=gen)  # (T, H + 2 Hkv, D): k and v adjacent
            k, v = qkv[:, 4:6], qkv[:, 6:]
            got, want = seq.update(layer, k, v), ref.update(layer, k, v)
            assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_min_tail_keeps_the_end_of_a_cached_prompt_computed():
    kv = _kv(prefix_cache_n=4)
    prompt = list(range(50, 63))  # 13 tokens
    a = kv.new_sequence(prompt)
    a.reserve(13)
    a.set_length(13)
    a.commit(prompt)
    a.release(keep_prefix=True)
    assert len(kv.new_sequence(prompt)) == 12  # default: all but the last token (3 blocks)
    kv.min_tail = 6  # the model computes short chunks differently: recompute at least 6
    assert len(kv.new_sequence(prompt)) == 4
