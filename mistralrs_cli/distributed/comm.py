"""The process group of a --tp run: joining it (torchrun's environment, or ranks this process
starts itself), the step channel from rank 0, and the watchdog that turns a lost rank into every
rank exiting non-zero with one line naming it.

Liveness: every rank bumps a counter in the rendezvous store twice a second; a rank whose
counter stands still for HEARTBEAT_TIMEOUT seconds is lost (dead, stopped or hung). Rank 0 also
waits on the ranks it started and names one the moment it exits. The model's collectives time
out after COLLECTIVE_TIMEOUT; the step channel, where the other ranks wait while rank 0 is idle,
does not (the heartbeat covers it).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch.distributed as dist

from ..errors import UserError

log = logging.getLogger(__name__)
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = float(os.environ.get("MISTRALRS_TP_HEARTBEAT_TIMEOUT", "10"))
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
IDLE_TIMEOUT = datetime.timedelta(days=30)  # the step channel: liveness is the heartbeat's job
EXIT_GRACE = 4.0  # after a fault: the server answers 503 this long, then the process exits
SPAWNED = "MISTRALRS_TP_SPAWNED"  # set in the ranks this process starts
USER_ERROR_STATUS = 3  # a started rank hit a user error: rank 0 hits and reports the same one


class Comm:
    """This process's place in the group, the step channel, and fault handling."""

    def __init__(self, rank: int, world: int, children: list[subprocess.Popen], spawned: bool):
        self.rank, self.world, self.children, self.spawned = rank, world, children, spawned
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.lock = threading.Lock()  # the step channel: one message at a time
        self.fault_hooks: list[Callable[[str], None]] = []  # rank 0's engine thread: fail it (503)
        self.faulted: str | None = None
        self.stopping = False
        self._fault_lock = threading.Lock()
        self.store = dist.PrefixStore("mistralrs-tp", dist.distributed_c10d._get_default_store())
        threading.Thread(target=self._heartbeat, name="tp-watchdog", daemon=True).start()
        for r, p in enumerate(children, start=1):
            threading.Thread(target=self._watch_child, args=(r, p), name=f"tp-rank{r}", daemon=True).start()
        if rank == 0:
            atexit.register(self.shutdown)

    # ---- the step channel ----
    def send(self, msg: Any) -> None:
        dist.broadcast_object_list([msg], src=0, group=self.control)

    def recv(self) -> Any:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # ---- liveness ----
    def _heartbeat(self) -> None:
        seen = {r: (-1, time.monotonic()) for r in range(self.world) if r != self.rank}
        while not self.stopping:
            try:
                self.store.add(f"hb/{self.rank}", 1)
                for r, (count, since) in seen.items():
                    now, c = time.monotonic(), self.store.add(f"hb/{r}", 0)
                    if c != count:
                        seen[r] = (c, now)
                    elif now - since > HEARTBEAT_TIMEOUT and not self.stopping:
                        self.fault(r, f"stopped answering (no heartbeat for {HEARTBEAT_TIMEOUT:g} s)")
                if self.store.check(["fault"]) and not self.stopping:
                    self.fault(None, self.store.get("fault").decode())
            except Exception as e:  # noqa: BLE001 - the store lives with rank 0 (or torchrun's agent)
                if not self.stopping:
                    self.fault(0, f"is gone (the rendezvous store does not answer: {type(e).__name__})")
                return
            time.sleep(HEARTBEAT_INTERVAL)

    def _watch_child(self, rank: int, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        if rc == USER_ERROR_STATUS:  # it hit a user error while loading; rank 0 hits and says the same
            return
        if not self.stopping:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            self.fault(rank, f"{how} (pid {proc.pid})")

    def fault(self, rank: int | None, why: str) -> None:
        """A rank is lost: say so once, fail rank 0's engine (the server answers 503), stop the
        ranks this process started, and exit non-zero. rank None: `why` names it already."""
        with self._fault_lock:
            if self.faulted is not None:
                return
            self.faulted = why if rank is None else f"tensor parallel: rank {rank} {why}"
        line = self.faulted if rank is None else f"{self.faulted}; every rank stops"
        if rank is not None:
            try:
                self.store.set("fault", line)
            except Exception:  # noqa: BLE001 - the store may be what was lost
                pass
        speak = self.rank == 0 or not self.spawned  # rank 0 speaks for the ranks it started
        hooks = list(self.fault_hooks)
        for hook in hooks:  # the engine fails: the server answers 503, then stops and says why
            try:
                hook(line)
            except Exception:  # noqa: BLE001
                log.exception("a tensor-parallel fault hook failed")
        self._stop_children()
        if hooks:  # unless the owner of the engine has exited by then (daemon timer)
            timer = threading.Timer(EXIT_GRACE, self._exit, args=(line if speak else None,))
            timer.daemon = True
            timer.start()
        else:
            self._exit(line if speak else None)

    @staticmethod
    def _exit(line: str | None) -> None:
        if line is not None:
            print(f"error: {line}.", file=sys.stderr, flush=True)
        os._exit(1)

    def collective_failed(self, err: BaseException) -> None:
        """A collective raised: the watchdog names the lost rank within its timeout; wait for it
        (this call does not return), else report the error itself."""
        end = time.monotonic() + 2  # a rank that died: rank 0's child monitor names it at once
        while self.faulted is None and time.monotonic() < end:
            time.sleep(0.05)
        if self.faulted is None:
            for hook in list(self.fault_hooks):  # the server answers 503 while the watchdog looks
                try:
                    hook(f"tensor parallel: a collective failed ({type(err).__name__})")
                except Exception:  # noqa: BLE001
                    pass
        time.sleep(HEARTBEAT_TIMEOUT + 2 * HEARTBEAT_INTERVAL + 1)
        self.fault(None, f"tensor parallel: rank {self.rank}: a collective failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); every rank stops")
        time.sleep(EXIT_GRACE + 1)
        os._exit(1)

    # ---- shutdown ----
    def shutdown(self) -> None:
        """Rank 0 is done: tell the other ranks to stop, and reap the ones it started."""
        if self.faulted is not None or self.stopping:
            return
        self.stopping = True
        sent = False
        if self.lock.acquire(timeout=0.5):  # else the engine thread is mid-step (Ctrl-C): no waiting
            try:
                self.send(("stop",))
                sent = True
            except Exception:  # noqa: BLE001 - a rank already gone: the reaping below ends it
                pass
            finally:
                self.lock.release()
        if sent:  # the store may live in this process: keep it up until every rank has the word
            self._wait_stopped(2.0)
        self._stop_children(wait=5 if sent else 0)

    def stopped(self) -> None:
        """A follower got rank 0's stop: say so (rank 0 waits for it before it exits)."""
        self.stopping = True
        try:
            self.store.set(f"stopped/{self.rank}", "1")
        except Exception:  # noqa: BLE001
            pass

    def _wait_stopped(self, timeout: float) -> None:
        keys = [f"stopped/{r}" for r in range(1, self.world)]
        end = time.monotonic() + timeout
        try:
            while not self.store.check(keys) and time.monotonic() < end:
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - the store is gone with its host: nothing to wait for
            pass

    def _stop_children(self, wait: float = 0.0) -> None:
        self.stopping = True
        deadline = time.monotonic() + wait
        for p in self.children:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.children:
            if p.poll() is None:
                p.terminate()
        for p in self.children:
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---- joining the group ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child before exec: SIGKILL when rank 0 dies, however
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(world: int, payload: Any) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 on this host (python -m mistralrs_cli.distributed.follower) and
    point this process at a fresh localhost rendezvous as rank 0."""
    fd, path = tempfile.mkstemp(prefix="mistralrs-tp-", suffix=".pickle")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(payload, f)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    port = _free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            SPAWNED: "1"}
    children = []
    for r in range(1, world):
        env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
        children.append(subprocess.Popen([sys.executable, "-m", "mistralrs_cli.distributed.follower", path],
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent))
    os.environ.update({k: base[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")},
                      RANK="0", LOCAL_RANK="0")
    return children


def join(world: int, backend: str, payload: Any) -> Comm:
    """This process's rank in a group of `world`: torchrun's (RANK/WORLD_SIZE/MASTER_ADDR in the
    environment) or, without one, a group this process starts on this host."""
    children: list[subprocess.Popen] = []
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        children = spawn(world, payload)
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world:
        raise UserError(f"--tp {world} does not match WORLD_SIZE={env_world} of this launch; "
                        "give --tp the total number of processes (torchrun's nnodes x nproc-per-node).")
    rank = int(os.environ["RANK"])
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    except Exception:
        for p in children:
            p.kill()
        raise
    return Comm(rank, world, children, spawned=os.environ.get(SPAWNED) == "1")
