"""--tp 2 through the server and the Python API, and what happens when a rank is lost:

- the server (`mistralrs --tp 2 --port P plain -m DIR`) with the official openai client, 4
  concurrent streams: each greedy text equal to transformers' greedy tokens decoded;
- the Python API (Runner(tensor_parallel_size=2)) in a fresh process: the same text, also for a
  long prompt sent twice (the second reuses prefix-cache blocks);
- `-i` from a pipe: the reply is transformers' greedy continuation;
- torchrun as the README writes it; re_isq refused (400) under --tp;
- Ctrl-C (SIGINT) on rank 0 of a one-shot run mid-generation: exit 130, its rank gone;
- the second rank killed (SIGKILL) mid-generation: /health answers 503 or the server is gone, the
  server exits non-zero within 30 s with one line naming rank 1, and no rank is left;
- rank 0 killed: the rank it started is gone too (which shares the host's cores with it);
- rank 1 stopped (SIGSTOP, a hang): the same within 30 s, the line saying it stopped answering;
- two hosts: two network namespaces joined by a veth pair, one rank in each, rendezvous over TCP
  (skipped, saying why, where `ip netns` is not permitted).
"""
from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import gguf_builder as gb
from test_tp import MAX_TOKENS, PROMPT, hf_greedy_text, write_plain

MISTRALRS = Path(sys.executable).with_name("mistralrs")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    hf = gb.tiny_llama(0)
    return write_plain(tmp_path_factory.mktemp("tp_serve") / "llama", hf), hf


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(path: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([str(MISTRALRS), "--tp", "2", "--port", str(port), "plain", "-m", str(path)],
                            env=ENV, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not come up")


def _followers(pid: int) -> list[int]:
    """The processes rank 0 started (their parent is it)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"distributed.follower" in cmd:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_server_four_streams(tiny):
    from openai import OpenAI

    path, hf = tiny
    want = hf_greedy_text(hf, PROMPT, MAX_TOKENS)
    port = _port()
    proc = _serve(path, port)
    try:
        _wait_healthy(proc, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        texts: list[str] = [""] * 4

        def stream(i: int) -> None:
            for chunk in client.completions.create(model="x", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                texts[i] += chunk.choices[0].text if chunk.choices else ""
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert texts == [want] * 4
        r = httpx.post(f"http://127.0.0.1:{port}/v1/re_isq", json={"ggml_type": "Q8_0"}, timeout=30)
        assert r.status_code == 400 and "--isq" in r.json()["error"]["message"], r.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not [p for p in _followers(proc.pid) if _alive(p)]


LONG = " ".join(["rain falls in spain mainly on plains"] * 12)  # > 2 KV blocks of 32 tokens


def test_python_api(tiny):
    """The short prompt, then a long one twice: the second run's first blocks come from the
    prefix cache, which every rank's pool holds in the same blocks."""
    path, hf = tiny
    script = textwrap.dedent(f"""
        from mistralrs_cli.api import Runner, Which, CompletionRequest
        r = Runner(which=Which.Plain(model_id={str(path)!r}), tensor_parallel_size=2)
        for prompt in ({PROMPT!r}, {LONG!r}, {LONG!r}):
            out = r.send_completion_request(CompletionRequest(model="x", prompt=prompt, max_tokens={MAX_TOKENS},
                                                              temperature=0.0, ignore_eos=True))
            print(repr(out.choices[0].text))
        print(r.engine.kv.alloc.hits)
    """)
    run = subprocess.run([sys.executable, "-c", script], env=ENV, text=True, capture_output=True, timeout=240)
    assert run.returncode == 0, run.stderr
    *texts, hits = run.stdout.splitlines()
    want = [hf_greedy_text(hf, p, MAX_TOKENS) for p in (PROMPT, LONG, LONG)]
    assert [ast.literal_eval(t) for t in texts] == want
    assert int(hits) >= 2  # the second long prompt reused cached blocks


def test_interactive(tiny, tmp_path):
    """-i from a pipe under --tp 2: the reply is transformers' greedy continuation; \\exit ends
    every rank."""
    _, hf = tiny
    tok = gb.train_tokenizer()
    path = gb.write_gguf(tmp_path / "chat.gguf", hf, gb.gguf_vocab(tok),
                         chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    want = hf_greedy_text(hf, PROMPT, MAX_TOKENS)  # a chat template renders BOS itself; this one has none
    r = subprocess.run([str(MISTRALRS), "--tp", "2", "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                        "--ignore-eos", "-i", "gguf", "-f", str(path)], input=f"{PROMPT}\n\\exit\n",
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr
    assert want in r.stdout, (want, r.stdout)


def test_ctrl_c_one_shot(tiny):
    """SIGINT on rank 0 mid-generation: it exits (130, as without --tp) and its rank is gone."""
    path, _ = tiny
    # Ctrl-C as a terminal delivers it to a foreground job: SIGINT at its default in the child,
    # even when pytest itself runs as a background job (a non-interactive shell starts those with
    # SIGINT ignored, the child would inherit that and finish with exit 0)
    proc = subprocess.Popen([str(MISTRALRS), "--tp", "2", "--raw", "--prompt", PROMPT, "--temperature", "0",
                             "--max-tokens", "400", "--ignore-eos", "plain", "-m", str(path)], env=ENV, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        end = time.monotonic() + 120
        followers = _followers(proc.pid)
        while not followers and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
            followers = _followers(proc.pid)
        (follower,) = followers
        # the signal right after the first byte (the 400 tokens take ~3 s here)
        assert proc.stdout.read(1)  # generating
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        end = time.monotonic() + 10
        while _alive(follower) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _alive(follower)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_rank_killed_mid_generation(tiny):
    path, _ = tiny
    port = _port()
    proc = _serve(path, port)
    try:
        _wait_healthy(proc, port)
        body = {"model": "x", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": True}
        started = threading.Event()

        def generate() -> None:
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
                    for _ in r.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass
        threading.Thread(target=generate, daemon=True).start()
        assert started.wait(60)
        (follower,) = _followers(proc.pid)
        t0 = time.monotonic()
        os.kill(follower, signal.SIGKILL)
        try:  # meanwhile: 503, or already gone
            status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
            assert status in (200, 503)
        except httpx.HTTPError:
            pass
        rc = proc.wait(30)
        assert time.monotonic() - t0 < 30
        assert rc != 0
        err = proc.stderr.read()
        named = [line for line in err.splitlines() if "tensor parallel: rank 1" in line]
        assert len(named) == 1 and "killed by signal 9" in named[0], err
        assert not _alive(follower)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rank0_killed(tiny):
    path, _ = tiny
    port = _port()
    proc = _serve(path, port)
    try:
        _wait_healthy(proc, port)
        (follower,) = _followers(proc.pid)
        if "OMP_NUM_THREADS" not in ENV:  # the two ranks share this host's cores
            env = Path(f"/proc/{follower}/environ").read_bytes().split(b"\0")
            assert f"OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // 2)}".encode() in env
        proc.kill()
        proc.wait()
        end = time.monotonic() + 30
        while _alive(follower) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _alive(follower)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_rank_hung_mid_generation(tiny):
    """SIGSTOP on rank 1: its heartbeat stops; rank 0 names it and every rank exits non-zero."""
    path, _ = tiny
    port = _port()
    proc = _serve(path, port)
    follower = None
    try:
        _wait_healthy(proc, port)
        (follower,) = _followers(proc.pid)
        t0 = time.monotonic()
        os.kill(follower, signal.SIGSTOP)
        statuses = set()
        while proc.poll() is None and time.monotonic() - t0 < 30:  # meanwhile /health says 503
            try:
                statuses.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        rc = proc.wait(max(0.1, 30 - (time.monotonic() - t0)))
        assert time.monotonic() - t0 < 30 and rc != 0
        assert 503 in statuses, statuses
        named = [line for line in proc.stderr.read().splitlines() if "tensor parallel: rank 1" in line]
        assert len(named) == 1 and "stopped answering" in named[0], named
        end = time.monotonic() + 10
        while _alive(follower) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _alive(follower)
    finally:
        if follower is not None and _alive(follower):
            os.kill(follower, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_torchrun(tiny):
    """`torchrun ... -m mistralrs_cli --tp 2 ...` as the README writes it: both ranks run the
    command; rank 0 prints the text, rank 1 nothing."""
    path, hf = tiny
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", f"127.0.0.1:{_port()}", "-m", "mistralrs_cli", "--tp", "2", "--raw",
                          "--prompt", PROMPT, "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
                          "plain", "-m", str(path)], env=ENV, text=True, capture_output=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n") == hf_greedy_text(hf, PROMPT, MAX_TOKENS)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (10.77.N.1 and 10.77.N.2), deleted after."""
    tag = os.getpid() % 200
    a, b = f"mrs-tp-a{tag}", f"mrs-tp-b{tag}"
    try:
        probe = _ip("netns", "add", a)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"`ip netns` cannot run here ({e})")
    if probe.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here ({probe.stderr.strip()})")
    try:
        steps = [("netns", "add", b), ("link", "add", f"v{a}", "type", "veth", "peer", "name", f"v{b}"),
                 ("link", "set", f"v{a}", "netns", a), ("link", "set", f"v{b}", "netns", b),
                 ("-n", a, "addr", "add", f"10.77.{tag}.1/24", "dev", f"v{a}"),
                 ("-n", b, "addr", "add", f"10.77.{tag}.2/24", "dev", f"v{b}"),
                 ("-n", a, "link", "set", f"v{a}", "up"), ("-n", b, "link", "set", f"v{b}", "up"),
                 ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` is not permitted here ({r.stderr.strip()})")
        yield (a, f"v{a}", f"10.77.{tag}.1"), (b, f"v{b}", f"10.77.{tag}.2")
    finally:
        _ip("netns", "delete", a)
        _ip("netns", "delete", b)


def test_two_hosts_over_veth(tiny, two_hosts):
    """Rank 0 in one namespace, rank 1 in the other, rendezvous over TCP across the veth pair
    (RANK / WORLD_SIZE / MASTER_ADDR as torchrun sets them on each host)."""
    path, hf = tiny
    master = two_hosts[0][2]
    procs = []
    for rank, (ns, dev, _) in enumerate(two_hosts):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": master, "MASTER_PORT": "29611",
               "LOCAL_RANK": "0", "GLOO_SOCKET_IFNAME": dev}
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, str(MISTRALRS), "--tp", "2", "--raw", "--prompt", PROMPT, "--temperature",
             "0", "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "plain", "-m", str(path)],
            env=env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert outs[0][0].rstrip("\n") == hf_greedy_text(hf, PROMPT, MAX_TOKENS)
    assert outs[1][0] == ""  # rank 1 prints nothing: rank 0 owns the outputs
