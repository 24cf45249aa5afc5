"""The scheduler alone (pure Python): decodes first, whole prompts when they fit, chunks when a
prompt is longer than a step, FCFS, max_seqs, recompute preemption when the pool is full."""
from __future__ import annotations

from mistralrs_cli.engine.request import Request
from mistralrs_cli.engine.scheduler import Scheduler
from mistralrs_cli.types import SamplingParams


class Pool:
    """reserve/release over a count of free token slots (a stand-in for the block pool)."""

    def __init__(self, slots: int):
        self.free, self.held = slots, {}

    def reserve(self, req: Request, n: int) -> bool:
        extra = n - self.held.get(req.id, 0)
        if extra > self.free:
            return False
        if extra > 0:
            self.free -= extra
            self.held[req.id] = n
        return True

    def release(self, req: Request) -> None:
        self.free += self.held.pop(req.id, 0)


def _req(i: int, n: int) -> Request:
    return Request(f"r{i}", list(range(n)), SamplingParams())


def _run(sched: Scheduler, work) -> None:
    """What the engine does after a forward: computed tokens advance; a finished prompt yields a token."""
    for w in work:
        w.req.n_computed += w.n
        if w.req.n_computed == w.req.n_known:
            w.req.output_ids.append(7)


def test_a_prompt_that_does_not_fit_waits_whole_instead_of_being_cut():
    pool = Pool(1000)
    s = Scheduler(max_seqs=8, max_batch_tokens=10, reserve=pool.reserve, release=pool.release)
    a, b = _req(0, 6), _req(1, 6)
    s.add(a), s.add(b)
    work = s.schedule()
    assert [(w.req.id, w.n) for w in work] == [("r0", 6)]  # b would be cut to 4: it waits
    _run(s, work)
    work = s.schedule()
    assert [(w.req.id, w.n) for w in work] == [("r0", 1), ("r1", 6)]  # decode first, then b whole


def test_a_prompt_longer_than_a_step_goes_in_chunks_beside_decodes():
    pool = Pool(1000)
    s = Scheduler(max_seqs=8, max_batch_tokens=10, reserve=pool.reserve, release=pool.release)
    a = _req(0, 3)
    s.add(a)
    _run(s, s.schedule())
    long_ = _req(1, 25)
    s.add(long_)
    sizes = []
    while long_.n_computed < 25:
        work = s.schedule()
        assert work[0].req is a and work[0].n == 1  # the stream never waits
        sizes.append([w.n for w in work if w.req is long_][0])
        _run(s, work)
    assert sizes == [9, 9, 7]


def test_max_seqs_and_preemption_by_recompute():
    pool = Pool(12)
    s = Scheduler(max_seqs=2, max_batch_tokens=100, reserve=pool.reserve, release=pool.release)
    reqs = [_req(i, 5) for i in range(3)]
    for r in reqs:
        s.add(r)
    work = s.schedule()
    assert [w.req.id for w in work] == ["r0", "r1"]  # max_seqs
    _run(s, work)
    work = s.schedule()  # 2 x 6 tokens = the whole pool
    _run(s, work)
    work = s.schedule()  # r0 needs a 7th slot: r1 (the newest) is preempted
    assert [w.req.id for w in work] == ["r0"] and s.preemptions == 1
    assert reqs[1].n_computed == 0 and s.waiting[0] is reqs[1] and len(reqs[1].output_ids) == 2
