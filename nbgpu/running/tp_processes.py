"""The tensor-parallel worker processes seen from the kernel: start them, send a command to all, collect the replies
while showing their output in the calling cell, cancel a call, and stop them on every path.

A reader thread receives every message (so a KeyboardInterrupt in the kernel can never cut one in half) and puts it
on a queue; the calling thread takes them off, prints output (so it lands in the cell that made the call) and
gathers the replies. A worker's death is seen through its process sentinel.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import re
import socket
import sys
import threading
import time

from ..errors import UsageError
from . import tp_worker

CANCEL_GRACE_S = 15.0  # after Interrupt: time for every rank to reach its next token and stop there
ERROR_GRACE_S = 10.0  # after one rank failed: time for the others to report (else they wait in a collective)
STOP_GRACE_S = 10.0  # close(): time to leave the process group before SIGTERM, then SIGKILL
POLL_S = 0.2


class TensorParallelError(RuntimeError):
    """A worker failed: its error and traceback are in the message, which also says whether the model is usable."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """The worker processes of one tensor-parallel model. Holds no reference to the model handle."""

    def __init__(self, spec: dict, labels: list[str]):
        import torch.multiprocessing as torch_mp

        n = spec["world_size"]
        self.n, self.labels = n, labels
        self.reason: str | None = None  # why the workers stopped; None while they run
        self.on_stop: list = []  # callables run once the processes are gone (simulated memory release)
        self._call_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._partial: dict = {}  # (rank, stream) -> the start of a line not yet ended
        self._queue: queue.Queue = queue.Queue()
        self._interrupted = False
        self._reading = True
        ctx = multiprocessing.get_context("spawn")
        self.shared = ctx.Array("q", n + 1)  # per rank: tokens generated in this call; last: the stop count
        pipes = [ctx.Pipe(duplex=True) for _ in range(n)]
        self.conns = [kernel_end for kernel_end, _ in pipes]
        worker_ends = [worker_end for _, worker_end in pipes]
        self._reset_cancel()
        before = set(multiprocessing.active_children())
        try:
            self.context = torch_mp.start_processes(tp_worker.main, args=(spec, worker_ends, self.shared),
                                                    nprocs=n, join=False, start_method="spawn")
        except BaseException:
            for p in set(multiprocessing.active_children()) - before:  # the ranks started before the failure
                p.kill()
                p.join()
            raise
        finally:
            for end in worker_ends:
                end.close()
        self.processes = list(self.context.processes)
        self.pids = [p.pid for p in self.processes]
        self._reader = threading.Thread(target=self._read, daemon=True, name="nbgpu-tp-reader")
        self._reader.start()

    # --- reading (reader thread) ------------------------------------------------------------------------------
    def _read(self) -> None:
        live = {conn: rank for rank, conn in enumerate(self.conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes)}
        while self._reading and (live or sentinels):
            ready = multiprocessing.connection.wait([*live, *sentinels], timeout=POLL_S)
            for obj in ready:
                if obj in live:
                    self._receive(obj, live)
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    conn = self.conns[rank]
                    while conn in live and conn.poll(0.05):  # its last words first
                        self._receive(conn, live)
                    self._queue.put((rank, ("exited",)))

    def _receive(self, conn, live: dict) -> None:
        rank = live[conn]
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            del live[conn]
            return
        except Exception as exc:  # noqa: BLE001 - a reply the kernel cannot unpickle is that call's error
            message = ("error", type(exc).__name__, f"the kernel could not read this worker's reply: {exc}", "",
                       False)
        self._queue.put((rank, message))

    # --- output -----------------------------------------------------------------------------------------------
    def _show(self, rank: int, stream: str, text: str) -> None:
        """Write a worker's output to the kernel's stream (the calling cell), whole lines only (a line may come in
        pieces, and the ranks' pieces interleave), each prefixed by its rank; a progress bar's '\r' ends a line."""
        key = (rank, stream)
        text = self._partial.pop(key, "") + text
        end = max(text.rfind("\n"), text.rfind("\r")) + 1
        if end < len(text):
            self._partial[key] = text[end:]
        lines = [p for p in re.split(r"(?<=[\r\n])", text[:end]) if p]
        self._write(stream, "".join(f"[rank {rank}] {line}" if line not in ("\n", "\r") else line
                                    for line in lines))

    def _show_partial(self) -> None:
        """At the end of a call: what is left of a line without its end (everything the call printed has come)."""
        partial, self._partial = self._partial, {}
        for (rank, stream), text in sorted(partial.items()):
            self._write(stream, f"[rank {rank}] {text}\n")

    @staticmethod
    def _write(stream: str, text: str) -> None:
        if text:
            target = sys.stderr if stream == "stderr" else sys.stdout
            target.write(text)
            target.flush()

    # --- calls (calling thread) -------------------------------------------------------------------------------
    def check_running(self) -> None:
        if self.reason is not None:
            raise UsageError(f"this tensor-parallel model is closed ({self.reason}): load it again with "
                             "nbgpu.load(plan)")

    def wait_ready(self) -> list:
        """The load: each rank's ("ready", info). Any failure or Interrupt stops every worker."""
        return self._collect(command=None)

    def call(self, *command) -> list:
        """Run `command` on every rank; returns each rank's result (rank order)."""
        self.check_running()
        if not self._call_lock.acquire(blocking=False):
            raise UsageError("this tensor-parallel model is already running a call (from another thread): one call "
                             "at a time")
        try:
            self._drain()
            self.check_running()
            self._reset_cancel()
            return self._collect(command=command)
        finally:
            self._call_lock.release()

    def _drain(self) -> None:
        """Show output that arrived between calls; notice a worker that died meanwhile."""
        while True:
            try:
                rank, message = self._queue.get_nowait()
            except queue.Empty:
                return
            if message[0] == "out":
                self._show(rank, message[1], message[2])
            elif message[0] == "exited":
                self._died(rank, during_call=False)

    def show_remaining_output(self) -> None:
        """Print what the workers wrote after the last call (when closing in a cell)."""
        while True:
            try:
                rank, message = self._queue.get_nowait()
            except queue.Empty:
                break
            if message[0] == "out":
                self._show(rank, message[1], message[2])
        self._show_partial()

    def _send_all(self, command) -> None:
        """Send from a helper thread: an Interrupt cannot leave one rank with the command and another without."""
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)

        def send():
            for conn in self.conns:
                try:
                    conn.send_bytes(data)
                except OSError:  # that worker has ended: the reader thread reports its exit
                    pass

        sender = threading.Thread(target=send, daemon=True, name="nbgpu-tp-send")
        sender.start()
        while sender.is_alive():
            try:
                sender.join()
            except KeyboardInterrupt:
                self._interrupted = True

    def _collect(self, command) -> list:
        try:
            return self._collect_replies(command)
        finally:
            self._show_partial()

    def _collect_replies(self, command) -> list:
        self._interrupted = False
        if command is not None:
            self._send_all(command)
        replies: dict[int, tuple] = {}
        deadline, cancel_step = None, None
        loading = command is None
        if self._interrupted:
            cancel_step, deadline = self._cancel(), time.monotonic() + CANCEL_GRACE_S
        while len(replies) < self.n:
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out(replies, cancel_step)
            try:
                try:
                    rank, message = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                kind = message[0]
                if kind == "out":
                    self._show(rank, message[1], message[2])
                elif kind == "exited":
                    self._died(rank, during_call=True, loading=loading, reply=replies.get(rank))
                else:
                    replies[rank] = message
                    if kind == "error" and deadline is None:
                        deadline = time.monotonic() + ERROR_GRACE_S
            except KeyboardInterrupt:
                if loading or cancel_step is not None:  # a load cannot be cancelled; a second Interrupt stops
                    self.stop("interrupted while " + ("loading" if loading else "cancelling a call"),
                              graceful=False)
                    raise
                self._interrupted = True
                cancel_step, deadline = self._cancel(), time.monotonic() + CANCEL_GRACE_S
        return self._results([replies[r] for r in range(self.n)], cancel_step, loading)

    def _results(self, replies: list, cancel_step, loading: bool) -> list:
        errors = [(rank, r) for rank, r in enumerate(replies) if r[0] == "error"]
        if errors:
            rank, (_, name, text, trace, is_oom) = errors[0]
            if loading:
                self.stop(f"rank {rank} failed to load", graceful=False)
            if is_oom:
                from . import oom

                shortage = oom.parse(text)
                usable = "load it again with a plan that fits" if loading else "the model is still loaded"
                raise oom.NotEnoughMemory(f"{self.labels[rank]} ran {shortage.describe()} ({usable}).\n{trace}",
                                          shortage.missing, rank)
            state = "every worker has been stopped" if loading else "the model is still loaded and usable"
            raise TensorParallelError(f"{self.labels[rank]} raised {name}: {text}\n({state})\n\n{trace}")
        if self._interrupted:
            stopped = [r[1] for r in replies if r[0] == "cancelled"]
            if stopped:
                sys.stderr.write(f"nbgpu: interrupted; every worker stopped at the same generated token "
                                 f"({stopped[0]}). The model is still loaded and usable.\n")
            else:
                sys.stderr.write("nbgpu: interrupted; the call had already finished on every worker, its result "
                                 "is dropped. The model is still loaded and usable.\n")
            raise KeyboardInterrupt
        return [r[1] for r in replies]

    def _cancel(self) -> int:
        """Ask every rank to stop at the same token: one past the furthest rank's count (see tp_worker.CancelPoint)."""
        with self.shared.get_lock():
            stop = max(self.shared[: self.n]) + 1
            self.shared[self.n] = stop
        sys.stderr.write("nbgpu: interrupting the tensor-parallel call on every worker...\n")
        return stop

    def _reset_cancel(self) -> None:
        with self.shared.get_lock():
            for i in range(self.n):
                self.shared[i] = 0
            self.shared[self.n] = tp_worker.NEVER

    def _timed_out(self, replies: dict, cancel_step) -> None:
        waiting = [self.labels[r] for r in range(self.n) if r not in replies]
        if cancel_step is not None:
            why = (f"interrupted, and {', '.join(waiting)} did not reach a point where the call can stop on every "
                   f"rank within {CANCEL_GRACE_S:.0f} s (loading, compiling or a long prefill cannot be cut "
                   "half-way on one rank)")
            self.stop(why, graceful=False)
            sys.stderr.write(f"nbgpu: {why}; every worker has been stopped. Load the model again.\n")
            raise KeyboardInterrupt
        rank, (_, name, text, trace, _) = next((r, m) for r, m in sorted(replies.items()) if m[0] == "error")
        why = (f"{self.labels[rank]} raised {name} while {', '.join(waiting)} waited for it in a collective "
               "operation")
        self.stop(why, graceful=False)
        raise TensorParallelError(f"{why}: {text}\nEvery worker has been stopped; load the model again.\n\n{trace}")

    def _died(self, rank: int, during_call: bool, loading: bool = False, reply=None) -> None:
        if self.reason is not None:
            return
        why = f"{self.labels[rank]} (pid {self.pids[rank]}) " + self._exit_reason(rank)
        self.stop(why, graceful=False)
        what = "while loading" if loading else ("during the call" if during_call else "between calls")
        error = ""
        if reply is not None and reply[0] == "error":  # it reported an error before it ended: that is the cause
            _, name, text, trace, _ = reply
            error = f"\nIt raised {name}: {text}\n\n{trace}"
        raise TensorParallelError(f"{why} {what}. The other workers have been stopped and the model is closed: "
                                  f"load it again with nbgpu.load(plan).{error}")

    def _exit_reason(self, rank: int) -> str:
        """torch's ProcessContext words for the exit (with the traceback of a worker that raised)."""
        from torch.multiprocessing.spawn import ProcessException

        try:
            self.context.join(timeout=1.0, grace_period=1.0)  # also stops the others (SIGTERM, then SIGKILL)
        except ProcessException as exc:
            return str(exc).strip()
        code = self.processes[rank].exitcode
        return f"exited (exit code {code})"

    # --- stopping ---------------------------------------------------------------------------------------------
    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self.processes]

    def stop(self, reason: str, graceful: bool = True) -> None:
        """Stop every worker (idempotent): ask them to leave, then SIGTERM, then SIGKILL; nothing is left behind."""
        with self._stop_lock:
            if self.reason is None:
                self.reason = reason
            if self._stopped:
                return
            self._stopped = True
            self._stop_processes(graceful)

    def _stop_processes(self, graceful: bool) -> None:
        if graceful:
            for conn in self.conns:
                try:
                    conn.send_bytes(pickle.dumps(("stop",)))
                except OSError:
                    pass
            end = time.monotonic() + STOP_GRACE_S
            for p in self.processes:
                p.join(max(0.0, end - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(3.0)
            if p.is_alive():
                p.kill()
                p.join()
        self._reading = False
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join(timeout=2.0)
        for conn in self.conns:
            conn.close()
        for path in self.context.error_files:
            if os.path.exists(path):
                os.unlink(path)
        self.shared = None  # its lock's semaphore is unlinked once nothing holds it
        callbacks, self.on_stop = self.on_stop, []
        for callback in callbacks:
            callback()
