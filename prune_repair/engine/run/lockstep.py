"""Lockstep passes: several calibration batches through one model in ONE pass each, in step.

An exact repair (or a layer-by-layer reconstruction) decides site ``k`` from the statistics
of ALL batches, with the corrections of the sites before it applied, before anything after
``k`` may run. With one batch a hook does it inline. With ``B`` batches, :class:`Lockstep`
runs the ``B`` forwards as ``B`` threads that take strict turns (only one runs at a time;
the baton always goes to the lowest-numbered thread that can run, so the result does not
depend on timing). At a meeting point (a site's hook) each thread contributes its batch
(``contribute()``, in batch order) and waits; when every thread still running has arrived,
the last one calls ``decide()``, and all go on with the decision applied. A thread whose
forward ends without reaching a point is not waited for. Memory: all ``B`` batches'
activations at the frontier are alive at once, as for one batch of the total size; the
per-site passes (:attr:`Passes.PER_SITE`) are the low-memory alternative.

Torch's thread-local state (grad mode, autocast, the CUDA device and stream) is copied from
the caller into every thread; function modes and ``no_grad`` entered inside the forward are
per thread. An exception in one thread stops the others at their next point and is raised
in the caller; no thread outlives :meth:`Lockstep.run`.

Example:
    >>> seen = []
    >>> step = Lockstep()
    >>> def forward(x):
    ...     for k in range(2):
    ...         step.meet(k, f"site{k}", lambda: seen.append((k, x)), lambda: seen.append((k, "decided")))
    ...     return x.upper()
    >>> step.run([lambda: forward("a"), lambda: forward("b")])
    ['A', 'B']
    >>> seen
    [(0, 'a'), (0, 'b'), (0, 'decided'), (1, 'a'), (1, 'b'), (1, 'decided')]
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ..registry import MethodEnum

T = TypeVar("T")
WAIT_TIMEOUT_S = 3600.0
"""Safety net: a thread that waits this long for its turn stops the run with an error."""


class Passes(MethodEnum):
    """How an exact repair or a reconstruction goes over several calibration batches."""

    LOCKSTEP = "lockstep", "one pass per batch, the batches in step at every site (memory: all batches at once)"
    PER_SITE = "per-site", "one prefix pass per site (layer) and batch (memory: one batch at a time)"
    BLOCKWISE = "blockwise", ("one block of the model at a time over all batches, its inputs stored (memory: one "
                              "block input per batch and one batch inside one block; about 1 + sites per block / 2 "
                              "forwards)")


class _Abort(BaseException):
    """Unwinds a thread's forward after another thread failed (never reaches the caller)."""


class Lockstep:
    """Runs tasks as turn-taking threads that meet at numbered points (see the module doc).

    ``what`` names a point in error messages ("site", "layer").
    """

    def __init__(self, what: str = "site", timeout_s: float = WAIT_TIMEOUT_S):
        self.what, self.timeout_s = what, timeout_s
        self._lock = threading.Lock()
        self._wake: list[threading.Condition] = []  # one per thread: a handoff wakes only the next one
        self._local = threading.local()
        self._state: list[str] = []  # per thread: "ready", "waiting" or "done"
        self._at: list[int] = []
        self._turn: int | None = None
        self._decided: set[int] = set()
        self._deciders: dict[int, Callable[[], None]] = {}
        self._error: BaseException | None = None
        self._in_step = True

    def current(self) -> int:
        """The task index of the calling thread (its batch)."""
        index = getattr(self._local, "index", None)
        if index is None:
            raise RuntimeError("Lockstep.current() and meet() are for the tasks of Lockstep.run()")
        return index

    def all_decided(self, points: int) -> bool:
        """Whether points ``0..points-1`` are all decided, each with every thread that was then
        waiting at it (none was waiting further on): the forwards may stop here."""
        return len(self._decided) == points and self._in_step

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Run every task in its own thread, in lockstep; their results in task order."""
        n = len(tasks)
        self._state, self._at, self._turn = ["ready"] * n, [-1] * n, 0 if n else None
        self._wake = [threading.Condition(self._lock) for _ in range(n)]
        self._decided, self._deciders, self._error, self._in_step = set(), {}, None, True
        results: list[Any] = [None] * n
        state = _caller_state()
        threads = [threading.Thread(target=self._worker, args=(b, tasks[b], results, state), daemon=True,
                                    name=f"prune-repair-lockstep-{b}") for b in range(n)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException as e:  # KeyboardInterrupt in the caller: stop the threads, then raise
            self._fail(e)
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            raise
        if self._error is not None:
            raise self._error
        return results

    def meet(self, index: int, name: str, contribute: Callable[[], None], decide: Callable[[], None]) -> None:
        """Point ``index`` (execution order; ``name`` for errors): ``contribute()`` this thread's
        batch, wait for the others, and have the last one ``decide()``."""
        b = self.current()
        if index in self._decided:
            raise ValueError(
                f"batch {b + 1} of {len(self._state)} reached {self.what} '{name}' after it was decided from "
                "the other batches: the model takes data-dependent paths, so the batches cannot run in lockstep; "
                "pass the calibration data as one batch, or passes='per-site'")
        contribute()
        with self._lock:
            self._state[b], self._at[b] = "waiting", index
            self._deciders.setdefault(index, decide)
        self._pass_baton()
        self._wait_turn(b)

    # -- scheduling (every method below runs in the thread holding the baton) --

    def _worker(self, b: int, task: Callable[[], Any], results: list[Any], state: Callable[[], Any]) -> None:
        self._local.index = b
        try:
            self._wait_turn(b)
            with state():
                results[b] = task()
        except _Abort:
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            with self._lock:
                self._state[b] = "done"
            try:
                self._pass_baton()
            except BaseException as e:  # a decision taken after this thread finished failed
                self._fail(e)

    def _pass_baton(self) -> None:
        """Give the turn to the lowest ready thread; when none is ready, decide the earliest
        point the waiting threads are at (in this thread) and release the threads there."""
        while True:
            with self._lock:
                if self._error is not None:
                    self._wake_all()
                    return
                ready = [i for i, s in enumerate(self._state) if s == "ready"]
                waiting = [i for i, s in enumerate(self._state) if s == "waiting"]
                if ready or not waiting:
                    self._turn = ready[0] if ready else None
                    if ready:
                        self._wake[ready[0]].notify()
                    return
                index = min(self._at[i] for i in waiting)
                self._in_step &= all(self._at[i] == index for i in waiting)
                self._decided.add(index)
                decide = self._deciders.pop(index)
            decide()
            with self._lock:
                for i in waiting:
                    if self._at[i] == index:
                        self._state[i] = "ready"

    def _wait_turn(self, b: int) -> None:
        with self._lock:
            while self._error is None and not (self._turn == b and self._state[b] == "ready"):
                if not self._wake[b].wait(self.timeout_s):
                    self._error = RuntimeError(
                        f"batch {b + 1} waited {self.timeout_s:g} s for its turn in a lockstep pass and the run "
                        "was stopped: pass the calibration data as one batch, or passes='per-site'")
                    self._wake_all()
            if self._error is not None:
                raise _Abort

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            self._wake_all()

    def _wake_all(self) -> None:  # with the lock held
        for wake in self._wake:
            wake.notify()


def _caller_state() -> Callable[[], contextlib.ExitStack]:
    """A context factory re-entering the caller's thread-local torch state in another thread:
    grad mode, autocast, and the current CUDA device and stream."""
    grad = torch.is_grad_enabled()
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    device, stream = (torch.cuda.current_device(), torch.cuda.current_stream()) if cuda else (None, None)

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(grad))
        if cuda:
            stack.enter_context(torch.cuda.device(device))
            stack.enter_context(torch.cuda.stream(stream))
        for device_type, dtype in autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        return stack

    return enter


class Stream:
    """``produce(emit)`` run in a thread that pauses at every ``emit(value)`` until the next
    :meth:`next` (a forward pass handing out layer outputs one at a time, on demand).

    >>> s = Stream(lambda emit: [emit(v) for v in "ab"])
    >>> s.next(), s.next(), s.next()
    ((True, 'a'), (True, 'b'), (False, None))
    """

    def __init__(self, produce: Callable[[Callable[[Any], None]], Any], timeout_s: float = WAIT_TIMEOUT_S):
        self.produce, self.timeout_s = produce, timeout_s
        self._cv = threading.Condition()
        self._producing = self._finished = self._closed = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def next(self) -> tuple[bool, Any]:
        """``(True, value)`` of the next ``emit``, or ``(False, None)`` once ``produce`` returned."""
        with self._cv:
            if self._finished:
                return False, None
            self._producing = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._body, args=(_caller_state(),), daemon=True,
                                                name="prune-repair-stream")
                self._thread.start()
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: not self._producing, self.timeout_s):
                raise RuntimeError(f"a streamed forward pass gave no output for {self.timeout_s:g} s")
            if self._error is not None:
                raise self._error
            return (False, None) if self._finished else (True, self._value)

    def close(self) -> None:
        """Stop the producer where it paused (its forward unwinds) and join its thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _emit(self, value: Any) -> None:
        with self._cv:
            self._value, self._producing = value, False
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._producing or self._closed)
            if self._closed:
                raise _Abort

    def _body(self, state: Callable[[], Any]) -> None:
        try:
            with state():
                self.produce(self._emit)
        except _Abort:
            pass
        except BaseException as e:
            self._error = e
        finally:
            with self._cv:
                self._finished, self._producing = True, False
                self._cv.notify_all()
