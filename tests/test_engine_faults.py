"""No request can kill the engine thread: faults injected into one request's sampling, forward pass
or admission fail that request alone, the others finish with transformers' greedy text, the pool
gets every block back and the engine serves the next request. A fault no request can be blamed for
puts the thread in a failed state: every waiter gets an error, nothing hangs."""
from __future__ import annotations

import queue
import threading

import pytest

from mistralrs_cli.engine import engine as engine_mod
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.worker import EngineFailed, EngineThread
from mistralrs_cli.errors import UserError
from mistralrs_cli.types import EngineConfig, SamplingParams
from test_server import reference, tiny  # noqa: F401 - the module's tiny model fixture

PROMPTS = ["the quick brown fox", "rain falls in", "a lazy dog sleeps", "hello world"]
N = 6
POISON_SEED = 666  # marks the faulty request (greedy decoding ignores the seed)
TIMEOUT = 60  # seconds any one output may take: a hang fails the test instead of the suite


@pytest.fixture
def worker(tiny):  # noqa: F811
    # no prefix cache: an idle pool then has every block free, so "back where it started" is exact
    w = EngineThread(Engine(tiny.loaded, EngineConfig(prefix_cache_n=0)))
    yield w
    w.stop(timeout=30)


def submit(w: EngineThread, ids: list[int], seed: int | None = None) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    w.submit(ids, SamplingParams(max_tokens=N, ignore_eos=True, seed=seed), q.put)
    return q


def drain(q: queue.Queue) -> tuple[list[int], list]:
    """(token ids, final output) of one request."""
    toks = []
    while True:
        out = q.get(timeout=TIMEOUT)
        if out.token_id is not None:
            toks.append(out.token_id)
        if out.finish_reason is not None:
            return toks, out


def run_batch_with_one_faulty(tiny, w: EngineThread) -> None:  # noqa: F811
    """Four requests at once, the third carrying POISON_SEED: it fails, the others are right."""
    enc = tiny.loaded.tokenizer.encode
    free = w.call(lambda e: e.kv.alloc.n_free())
    qs = [submit(w, enc(p), POISON_SEED if i == 2 else None) for i, p in enumerate(PROMPTS)]
    for i, (p, q) in enumerate(zip(PROMPTS, qs)):
        toks, last = drain(q)
        if i == 2:
            assert last.finish_reason == "error" and "injected" in last.text
            assert isinstance(last.error, RuntimeError)
        else:
            assert last.finish_reason == "length" and toks == reference(tiny, enc(p), N)[0]
    assert w.call(lambda e: (e.has_unfinished(), e.kv.alloc.n_free())) == (False, free)
    toks, last = drain(submit(w, enc("hello world")))  # and the engine still serves
    assert last.finish_reason == "length" and toks == reference(tiny, enc("hello world"), N)[0]
    assert w.failure is None


def poison_the_sampler(monkeypatch) -> None:
    """Sampling raises for the request whose seed is POISON_SEED (a fault no validation catches)."""
    real = engine_mod.sample

    def sample(logits, recent, params, gen, mask=None):
        if params.seed == POISON_SEED:
            raise RuntimeError("injected sampler fault")
        return real(logits, recent, params, gen, mask)
    monkeypatch.setattr(engine_mod, "sample", sample)


def test_a_sampler_fault_fails_only_its_request(tiny, worker, monkeypatch):  # noqa: F811
    poison_the_sampler(monkeypatch)
    run_batch_with_one_faulty(tiny, worker)


def test_a_forward_fault_in_a_batch_is_retried_alone(tiny, worker):  # noqa: F811
    """The batched forward pass raises whenever the poisoned request is in it: every request is
    rerun alone, so only the poisoned one fails, and the others' text is still transformers'."""
    engine, batches = worker.engine, []
    real = engine.model.step

    def step(ids, positions, seqs, rows):
        batches.append(len(seqs))
        poisoned = {id(r.cache) for r in engine.scheduler.running if r.params.seed == POISON_SEED}
        if any(id(s.cache) in poisoned for s in seqs):
            raise RuntimeError("injected forward fault")
        return real(ids, positions, seqs, rows)
    engine.model.step = step
    try:
        run_batch_with_one_faulty(tiny, worker)
    finally:
        del engine.model.step
    assert max(batches) > 1  # the fault did hit a batch of several requests


def test_a_fault_while_adding_fails_only_its_request(tiny, worker, monkeypatch):  # noqa: F811
    def new_generator(seed):
        if seed == POISON_SEED:
            raise RuntimeError("injected admission fault")
        return None
    monkeypatch.setattr(engine_mod, "new_generator", new_generator)
    run_batch_with_one_faulty(tiny, worker)


def test_a_user_error_at_admission_is_delivered_as_such(tiny, worker, monkeypatch):  # noqa: F811
    def new_generator(seed):
        raise UserError("seed must be at least 0.")
    monkeypatch.setattr(engine_mod, "new_generator", new_generator)
    _, last = drain(submit(worker, tiny.loaded.tokenizer.encode("hi"), seed=1))
    assert last.finish_reason == "error" and last.text == "seed must be at least 0."
    assert isinstance(last.error, UserError) and worker.failure is None


def test_a_fault_no_request_caused_fails_the_thread_without_hanging(tiny, worker):  # noqa: F811
    """The scheduler itself raising: the thread fails, every waiter hears it, later calls too."""
    told: list[str] = []
    worker.on_failure = told.append
    enc = tiny.loaded.tokenizer.encode
    hold = threading.Event()
    worker.call(lambda e: setattr(e.scheduler, "schedule", lambda: hold.wait(TIMEOUT) and 1 / 0))
    qs = [submit(worker, enc(p)) for p in PROMPTS]
    hold.set()
    for q in qs:
        _, last = drain(q)
        assert last.finish_reason == "error" and "ZeroDivisionError" in last.text
        assert isinstance(last.error, EngineFailed)
    assert worker.failure is not None and "ZeroDivisionError" in worker.failure
    assert told == [worker.failure]
    with pytest.raises(EngineFailed):
        submit(worker, enc("hi"))
    with pytest.raises(EngineFailed):
        worker.call(lambda e: 1)
    assert worker.pending == 0


def test_the_python_api_path_raises_the_fault(tiny, monkeypatch):  # noqa: F811
    """Engine.generate (the Python API, one-shot and -i) raises the request's own exception."""
    def sample(*a):
        raise RuntimeError("injected sampler fault")
    monkeypatch.setattr(engine_mod, "sample", sample)
    engine = Engine(tiny.loaded, EngineConfig(prefix_cache_n=0))
    free = engine.kv.alloc.n_free()
    with pytest.raises(RuntimeError, match="injected sampler fault"):
        list(engine.generate(tiny.loaded.tokenizer.encode("hi"), SamplingParams(max_tokens=3)))
    assert engine.kv.alloc.n_free() == free and not engine.has_unfinished()
