"""The engine process: one per device, holding the server's only onnxruntime sessions, fed by every
HTTP worker through shared memory (ring.py). Started and restarted by supervisor.py.

    python -m service.engine.process --socket /tmp/convserve-engine-XXXX/cpu.sock

It loads and warms every model first and only then listens, so a worker that can connect talks to a
warmed engine (its /readyz says ready from then on). One thread reads every connection (EngineServer)
and takes the images as views of the worker's slot (no copy until the batch is assembled). A
sub-millisecond model's images (Engine.inline: LeNet) run in that thread at the end of each round,
every worker's together, as the in-process engine runs them on its event loop (inline.py); any other
model's go to its queue (batcher.py), where requests of every worker meet, and its inference thread's
done-callback writes each answer into its slot and sends one record back. Either way batches form
across workers.

A connection is either a worker's data connection (HELLO: its ring) or a one-shot control call
(ROLLOUT). After a rollout every data connection hears the new model list (MODELS), so every worker's
/models and cards follow. The process exits when its parent (the server) goes (its stdin closes);
SIGTERM alone does not stop it, so that workers draining after a SIGTERM to the group still have it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from typing import NamedTuple

from modelcard.reference import topk
from service.engine import Engine
from service.engine.batcher import Request
from service.engine.inline import run_pending
from service.engine.ring import (
    FLAG_SHED,
    MODEL,
    NO_SLOT,
    OP,
    OP_CANCEL,
    OP_ERROR,
    OP_HELLO,
    OP_INFER,
    OP_MODELS,
    OP_RESULT,
    OP_ROLLOUT,
    OUTPUT,
    OUTPUTS,
    RID,
    SEG,
    SLOT,
    THRESHOLD,
    Channel,
    attach,
    error_record,
    put_answer,
    record,
    view,
)
from service.errors import Overloaded
from service.settings import Settings

log = logging.getLogger("convserve")
# A worker that reads none of its answers for this long is dropped (its requests fail, it reconnects):
# the loop sends with blocking sendall, and must not wait on one worker forever.
SEND_TIMEOUT_S = 10.0


def describe(engine: Engine) -> dict:
    """What a worker needs to know of the served models: cards, descriptions, tile sides, in order."""
    return {"models": [{"tag": m.tag, "card": m.card.to_dict(), "describe": m.describe(),
                        "tile_side": engine.tile_side(name)} for name, m in engine.models.items()],
            "max_items": engine.settings.max_batch_size, "pid": os.getpid()}


class Task(NamedTuple):
    """What answering a request needs: where its pixels lie, what it asked for."""
    connection: Connection
    fields: tuple  # its record, unpacked
    buf: memoryview  # its slot (or segment): pixels, then the answer after them
    nbytes: int  # the pixels' size: the answer starts after them (ring.response_offset)
    output: str  # what the worker asked for
    want: str  # what the model is asked for (scores when the graph's top-k head is too short)
    k: int


class Reply:
    """A request's future when its model runs on the loop (run_pending): its answer goes to its
    connection's outbox, sent with the rest of the round's answers (Channel.flush)."""

    __slots__ = ("task", "_done")

    def __init__(self, task: Task) -> None:
        self.task, self._done = task, False

    def set_result(self, value) -> None:
        self._answer(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._answer(None, error)

    def _answer(self, value, error: BaseException | None) -> None:
        self._done = True
        connection = self.task.connection
        connection.answer(self.task, value, error, connection.channel.queue)

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False  # it runs in the round it arrived in: nothing to cancel


class EngineServer:
    """One thread reads every worker's connection (selectors): what arrived in a round for a
    sub-millisecond model (Engine.inline) runs there as one batch, and every connection's answers leave
    in one send. Why one thread, not one per connection: a thread blocked in recv must be woken by the
    kernel for every record a worker sends, and on this VM a cross-process wake-up cost more than
    LeNet's share of a batch (with a thread per connection the engine did 1.7 context switches and
    ~60-80 µs of CPU per request); a loop busy running a batch is not woken, it finds the records when
    it next looks. Models on their inference threads (the rest, every GPU model) answer from there."""

    def __init__(self, engine: Engine, path: str) -> None:
        self.engine, self.path = engine, path
        self.names = list(engine.models)  # a record's model field indexes this (rollouts keep names)
        self.connections: set[Connection] = set()  # workers' data connections (after HELLO)
        self.lock = threading.Lock()
        self.rollout_lock = threading.Lock()
        self.selector = selectors.DefaultSelector()

    def serve_forever(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a dead predecessor's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path + ".new")
        os.rename(self.path + ".new", self.path)  # appears only once listening is possible
        listener.listen(64)
        log.info("engine process %d listening on %s", os.getpid(), self.path)
        self.selector.register(listener, selectors.EVENT_READ)
        while True:
            combined: dict[str, list[Request]] = {}  # what arrived in this round runs together
            readable = []
            for key, _ in self.selector.select():
                if key.data is None:
                    self.accept(listener)
                    continue
                try:
                    alive = key.data.read(combined)
                except Exception:  # noqa: BLE001 - one worker's trouble must not stop the others' engine
                    log.exception("engine: dropping a connection")
                    alive = False
                if alive:
                    readable.append(key.data)
                else:
                    self.selector.unregister(key.fileobj)
                    key.data.close()
            for name, requests in combined.items():
                run_pending(self.engine.workers[name], requests)
            for connection in readable:
                connection.flush()

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
            sock.settimeout(SEND_TIMEOUT_S)
            connection = Connection(self, sock)
            connection.channel.send(self.models_record())  # first thing a worker reads
        except OSError as e:  # the caller left already, or out of file descriptors: the loop goes on
            log.warning("engine: a connection could not be accepted: %s", e)
            return
        self.selector.register(sock, selectors.EVENT_READ, connection)

    def models_record(self) -> bytes:
        return record(OP_MODELS, payload=json.dumps(describe(self.engine)).encode())

    def broadcast_models(self) -> None:
        data = self.models_record()
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            connection.send(data)


class Connection:
    def __init__(self, server: EngineServer, sock: socket.socket) -> None:
        self.server, self.engine = server, server.engine
        self.channel = Channel(sock)
        self.ring: memoryview | None = None
        self.slot_bytes = 0
        self.running: dict[int, Future] = {}  # rid → the queue's future, for CANCEL

    def read(self, combined: dict[str, list[Request]]) -> bool:
        """What the worker sent (the socket is readable: recv does not block); False once it is gone."""
        try:
            data = self.channel.sock.recv(1 << 16)
        except OSError:
            return False
        for fields, payload in self.channel.parse(data):
            self.handle(fields, payload, combined)
        return bool(data)

    def send(self, data: bytes) -> None:
        """From any thread. A send that fails (the worker gone, or not reading for SEND_TIMEOUT_S)
        may have left half a record: the connection is shut down, and the loop then drops it."""
        try:
            self.channel.send(data)
        except OSError:
            self.drop()

    def flush(self) -> None:
        try:
            self.channel.flush()
        except OSError:
            self.drop()

    def drop(self) -> None:
        try:
            self.channel.sock.shutdown(socket.SHUT_RDWR)  # the loop's next read sees the end
        except OSError:
            pass

    def close(self) -> None:
        """The worker is gone: its queued images are dropped, not run."""
        with self.server.lock:
            self.server.connections.discard(self)
        for future in list(self.running.values()):
            future.cancel()
        self.channel.sock.close()

    def handle(self, fields: tuple, payload: bytes, combined: dict[str, list[Request]]) -> None:
        op = fields[OP]
        if op == OP_INFER:
            self.infer(fields, combined)
        elif op == OP_CANCEL:
            future = self.running.get(fields[RID])
            if future is not None:
                future.cancel()  # not started: dropped, and its done-callback answers "cancelled"
        elif op == OP_HELLO:
            hello = json.loads(payload)
            self.ring, self.slot_bytes = attach(hello["ring"]), hello["slot_bytes"]
            with self.server.lock:
                self.server.connections.add(self)
        elif op == OP_ROLLOUT:  # seconds of loading and warming: not on the loop
            threading.Thread(target=self.roll_out, args=(json.loads(payload)["tag"],), daemon=True,
                             name="engine-rollout").start()

    def buffer(self, fields: tuple) -> memoryview:
        slot = fields[SLOT]
        if slot == NO_SLOT:
            return attach(fields[SEG].rstrip(b"\0").decode())
        return self.ring[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def infer(self, fields: tuple, combined: dict[str, list[Request]], want: str | None = None) -> None:
        """Window images of a sub-millisecond model join `combined`, run at the end of the loop's round;
        the rest go to the model's queue and its inference thread, which answers each as it finishes."""
        rid = fields[RID]
        try:
            buf = self.buffer(fields)
            x = view(buf, fields)
            name = self.server.names[fields[MODEL]]
            worker = self.engine.workers[name]
            output, k = OUTPUTS[fields[OUTPUT]], fields[10]
            if want is None:  # Engine.infer's rule: the graph's top-k head unless too short for k
                want = "scores" if output == "topk" and k > worker.model.card.topk_k > 0 else output
            task = Task(self, fields, buf, x.nbytes, output, want, k)
            if (name in self.engine.inline and output != "peaks" and len(x) <= worker.queue.max_items
                    and x.shape[1:] == worker.model.window_shape):
                combined.setdefault(name, []).append(Request(x, Reply(task), time.perf_counter(), True,
                                                             want))
                return
            threshold = float(fields[THRESHOLD]) if output == "peaks" else None
            future = worker.queue.put(x, bool(fields[1] & FLAG_SHED), want, threshold)
        except Overloaded as e:
            self.send(error_record(rid, e.kind, e.message, e.retry_after))
            return
        except Exception as e:  # noqa: BLE001 - the worker hears of it, the connection lives on
            log.exception("engine: request %d refused", rid)
            self.send(error_record(rid, "internal", f"{type(e).__name__}: {e}"))
            return
        self.running[rid] = future
        future.add_done_callback(lambda f: self.answered(task, f))

    def answered(self, task: Task, future: Future) -> None:
        """The inference thread's done-callback (or the canceller's): the answer out at once."""
        self.running.pop(task.fields[RID], None)
        if future.cancelled():
            self.send(error_record(task.fields[RID], "cancelled", "cancelled before it ran"))
        else:
            error = future.exception()
            self.answer(task, None if error else future.result(), error, self.send)

    def answer(self, task: Task, out, error: BaseException | None, send) -> None:
        """The answer into the slot, its record to `send`."""
        fields, rid = task.fields, task.fields[RID]
        try:
            if error is not None:
                data = error_record(rid, getattr(error, "kind", "internal"), str(error),
                                    getattr(error, "retry_after", None))
            else:
                output, want, k = task.output, task.want, task.k
                if output == "topk" and want == "scores":
                    out = topk(out[:, :, 0, 0], k)
                elif output == "topk" and out[0].shape[1] < k:  # a shorter head rolled out meanwhile
                    combined: dict[str, list[Request]] = {}
                    self.infer(fields, combined, want="scores")
                    for name, requests in combined.items():  # newly inline after a rollout: run them now
                        run_pending(self.engine.workers[name], requests)
                    self.flush()  # on an inference thread nothing else would
                    return
                if output == "topk":
                    out = (out[0][:, :k], out[1][:, :k])
                arrays = out if isinstance(out, tuple) else (out,)
                if put_answer(task.buf, task.nbytes, arrays):
                    data = record(OP_RESULT, rid=rid, a=arrays[0], b=arrays[1] if len(arrays) > 1 else None)
                else:
                    data = error_record(rid, "internal", "the answer is larger than the request's slot")
            send(data)  # neither way raises: Connection.send drops a failed connection, queue only appends
        except Exception:  # noqa: BLE001 - never let a callback kill the inference thread silently
            log.exception("engine: answering request %d failed", rid)

    def roll_out(self, tag: str) -> None:
        try:
            with self.server.rollout_lock:
                new, old = self.engine.roll_out(tag)
            answer = {"new": {"tag": new.tag, "warmup_ms": new.warmup_ms},
                      "old": {"tag": old.tag, "warmup_ms": old.warmup_ms}}
            kind = None
        except KeyError as e:
            answer, kind = {"message": str(e.args[0] if e.args else e)}, "KeyError"
        except Exception as e:  # noqa: BLE001 - the caller maps it (fronts/bento.py roll_out)
            kind = "NotFound" if type(e).__name__ == "NotFound" else "ValueError"
            answer = {"message": str(e)}
        self.send(record(OP_RESULT if kind is None else OP_ERROR,
                         payload=json.dumps({**answer, "type": kind}).encode()))
        if kind is None:
            self.server.broadcast_models()


def watch_parent() -> None:
    """Exit when the server that started this process is gone (our stdin, its pipe, closes)."""
    while sys.stdin.buffer.read(1 << 12):
        pass
    log.info("engine process %d: the server is gone, exiting", os.getpid())
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s [%(levelname)s] [engine:%(process)d] %(message)s")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the module docstring says why
    threading.Thread(target=watch_parent, daemon=True, name="watch-parent").start()
    engine = Engine.from_store(Settings())
    engine.warm_up()
    gc.freeze()  # as in a worker (fronts/bento.py): full collections never walk the models mid-request
    EngineServer(engine, args.socket).serve_forever()


if __name__ == "__main__":
    main()
