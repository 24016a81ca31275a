"""The engine loop: one thread owns the LLM and is the only caller of `LLM.engine_step` (a collective: under
tensor parallelism the workers replay each call).

HTTP handlers `submit` jobs and `abort` keys into a queue guarded by a condition; the thread takes everything queued,
makes one engine_step (queue the adds, abort the keys, step once), then hands each job what its request emitted
(`Update`: the StepOutputs of that step, whether it is finished, why it failed) through the job's `deliver`
callback, which app.py points at an asyncio queue (loop.call_soon_threadsafe). The text is made here, outside the
engine lock (RequestState.take); a request a stop string ended is aborted in the next engine_step, before that
step runs. With nothing queued or running the thread sleeps on the condition.

An add the engine refuses (context overflow, larger than the pool, a key in use: engine_step raises RequestRejected
naming its key before queuing anything) fails that job alone; the rest of its batch is retried. Any other exception
from the engine ends the loop: every job fails and the server reports itself down (503).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..api import LLM, RequestRejected
from ..outputs import StepOutput
from ..params import SamplingParams
from ..request_state import RequestState
from ..scheduler import EngineStats
from .errors import ApiError

log = logging.getLogger("specdec.server")
DEFAULT_MAX_QUEUED = 256  # requests waiting for a running slot before new ones get 503 (--max-queued-requests)


class Aborted(Exception):
    """The server shut down while the request ran."""


@dataclass(frozen=True)
class Update:
    outs: list[StepOutput]
    finished: bool
    error: Exception | None = None  # ValueError: refused (400); Aborted / ApiError / NonFiniteLogitsError


@dataclass(eq=False)
class Job:
    key: str
    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[Update], None]  # called on the loop thread
    submitted: float = field(default_factory=time.perf_counter)
    request: RequestState | None = None  # set by the loop thread before the first delivery
    first_token: float | None = None  # perf_counter when its first token was handed over
    finished_at: float | None = None


class EngineLoop:
    """max_queued: requests allowed to wait for a running slot (submitted, not yet admitted by the scheduler);
    past it submit raises ApiError 503. on_finish(job) runs on the loop thread when a request that ran ends."""

    def __init__(self, llm: LLM, max_queued: int, on_finish: Callable[[Job], None]):
        self.llm, self.max_queued, self.on_finish = llm, max_queued, on_finish
        self._cond = threading.Condition()
        self._adds: list[Job] = []
        self._aborts: list[str] = []
        self._live: dict[str, Job] = {}
        self._stopping = False
        self.down: str | None = None  # why the engine cannot serve any more
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="specdec-engine-loop", daemon=True)

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.down is not None:
                raise ApiError(503, f"the engine is down ({self.down})", code="engine_down")
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            waiting = len(self._adds) + self.stats.waiting
            if waiting >= self.max_queued:
                raise ApiError(503, f"the server is busy: {waiting} requests already wait for a slot (at most "
                                    f"{self.max_queued}, --max-queued-requests); retry later", code="queue_full")
            self._adds.append(job)
            self._cond.notify()

    def abort(self, key: str) -> None:
        """End a request now (its KV blocks are freed in the next engine_step). Unknown or finished keys: no-op."""
        with self._cond:
            self._aborts.append(key)
            self._cond.notify()

    def shutdown(self) -> None:
        """Refuse new requests (503) and abort every request now (their streams end with finish_reason "abort");
        the thread ends after that step. Does not wait (safe in a signal handler)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """shutdown(), then wait for the thread to end."""
        self.shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the loop thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not (self._adds or self._aborts or busy or self._stopping):
                    self._cond.wait()
                adds, aborts, self._adds, self._aborts = self._adds, self._aborts, [], []
                stopping = self._stopping
            if stopping:
                for j in adds:
                    j.deliver(Update([], True, Aborted("the server is shutting down")))
                adds, aborts = [], aborts + list(self._live)
            try:
                busy = self._step(adds, aborts)
            except Exception as e:  # the engine is in an unknown state: serve nothing more
                log.error("engine loop failed; the server is down:\n%s", traceback.format_exc())
                self._fail_all(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", adds)
                return
            if stopping and not busy:
                return

    def _step(self, adds: list[Job], aborts: list[str]) -> bool:
        """One engine_step, then each job's outputs; True while the engine has work."""
        pending = adds
        while True:
            try:
                new = self.llm.engine_step(adds=[(j.key, j.prompt, j.params) for j in pending], aborts=aborts)
                break
            except RequestRejected as e:  # nothing was queued or aborted: fail that add, retry the others
                bad = [j for j in pending if j.key == e.key]  # a key added twice fails both adds
                for j in bad:
                    log.info("%s: refused (%s)", j.key, e)
                    j.deliver(Update([], True, e))
                pending = [j for j in pending if j not in bad]
        busy = self._publish()  # before any delivery: a client told "done" must not then see stale counts
        for j in pending:
            j.request = new[j.key]
            self._live[j.key] = j
        now = time.perf_counter()
        for key, j in list(self._live.items()):
            r = j.request
            outs = r.take()
            if r.needs_abort:  # a stop string: free its blocks in the next step (queued like a client's abort)
                self.abort(key)
            if j.first_token is None and any(o.token_ids for o in outs):
                j.first_token = now
            if not r.finished and not outs:
                continue
            error = r.error if r.finish_reason == "error" else None
            if r.finished:
                j.finished_at = now
                del self._live[key]
                if r.finish_reason == "abort":
                    error = Aborted("the request was aborted")
                self.on_finish(j)  # first: a client that has its answer finds it in /metrics
            j.deliver(Update(outs, r.finished, error))
        return busy

    def _publish(self) -> bool:
        """Publish the engine's counts (what /metrics shows); True while it has work."""
        self.stats = self.llm.engine_stats()
        return bool(self.stats.running or self.stats.waiting)

    def _fail_all(self, reason: str, batch: list[Job]) -> None:
        with self._cond:
            self.down = reason
            jobs = list({id(j): j for j in [*batch, *self._live.values(), *self._adds]}.values())
            self._live, self._adds = {}, []
        for j in jobs:
            j.deliver(Update([], True, ApiError(503, f"the engine failed ({reason})", code="engine_down")))
