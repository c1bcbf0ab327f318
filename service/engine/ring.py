"""The hand-off between HTTP workers and an engine process: pixels and scores in shared memory, small
fixed-size records on a Unix socket to say which slot holds what (no pickling of arrays).

    ring = Ring(slots=128, slot_bytes=16384)        # a worker's: one shared segment cut into slots
    slot = ring.take(nbytes)                        # a free slot, or a one-off segment when none fits
    put(slot.buf, x)                                # uint8 (n, C, H, W) at offset 0
    channel.send(record(OP_INFER, rid=..., slot=slot.index, seg=slot.seg, a=x))
    ... the engine answers RESULT with the shapes; the arrays lie at offset response_offset(x.nbytes)

A slot holds a request and then its answer (after it, never over it: the engine may still read the
pixels while it writes), so a worker sizes each slot for both. The ring is the worker's: it creates and
unlinks it (and its resource tracker unlinks it if the worker is killed); the engine only maps it.
A request larger than a slot (dense tiles, large batches of large images) or one arriving while every
slot is taken gets a segment of its own, freed when its answer is read: the ring never blocks.

Record: 96 bytes, struct RECORD below, then `payload` bytes (JSON, only for control messages and
errors). Fixed size so that many records arriving together are read with one recv.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

# op, flags, output, dtype a, dtype b, ndim a, ndim b, pad | rid, slot, model, k | threshold, payload
# length | dims a (4) | dims b (4) | overflow segment name
RECORD = struct.Struct("<7Bx4IfI4I4I32s")
OP_INFER, OP_CANCEL, OP_RESULT, OP_ERROR, OP_HELLO, OP_MODELS, OP_ROLLOUT = range(1, 8)
FLAG_SHED = 1
OUTPUTS = ("scores", "topk", "peaks")
DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32))
_CODE = {d: i for i, d in enumerate(DTYPES)}
NO_SLOT = 0xFFFFFFFF  # the record's slot field when the data lies in a segment of its own
# field positions in an unpacked record
OP, FLAGS, OUTPUT, DTYPE_A, DTYPE_B, NDIM_A, NDIM_B, RID, SLOT, MODEL, K, THRESHOLD, PAYLOAD = range(13)
DIMS_A, DIMS_B, SEG = slice(13, 17), slice(17, 21), 21


def align(n: int) -> int:
    return (n + 63) & ~63


def response_offset(request_bytes: int) -> int:
    return align(request_bytes)


def record(op: int, rid: int = 0, slot: int = NO_SLOT, model: int = 0, output: int = 0, k: int = 0,
           threshold: float = 0.0, flags: int = 0, a: np.ndarray | None = None,
           b: np.ndarray | None = None, seg: str = "", payload: bytes = b"") -> bytes:
    """One record (and its payload), ready for the socket; `a`/`b` give only dtypes and shapes."""
    da, na, sa = _meta(a)
    db, nb, sb = _meta(b)
    return RECORD.pack(op, flags, output, da, db, na, nb, rid, slot, model, k, threshold, len(payload),
                       *sa, *sb, seg.encode()) + payload


def _meta(x: np.ndarray | None) -> tuple[int, int, tuple[int, ...]]:
    if x is None:
        return 0, 0, (0, 0, 0, 0)
    return _CODE[x.dtype], x.ndim, (*x.shape, *(0,) * (4 - x.ndim))


def error_record(rid: int, kind: str, message: str, retry_after: float | None = None) -> bytes:
    payload = json.dumps({"type": kind, "message": message, "retry_after": retry_after}).encode()
    return record(OP_ERROR, rid=rid, payload=payload)


def put(buf, x: np.ndarray, offset: int = 0) -> None:
    """Copy `x` into shared memory at `offset` (one memcpy)."""
    np.ndarray(x.shape, x.dtype, buffer=buf, offset=offset)[...] = x


def view(buf, fields: tuple, which: str = "a", offset: int = 0) -> np.ndarray:
    """The array a record describes, as a view into `buf` (no copy)."""
    dtype = DTYPES[fields[DTYPE_A if which == "a" else DTYPE_B]]
    ndim = fields[NDIM_A if which == "a" else NDIM_B]
    shape = fields[DIMS_A if which == "a" else DIMS_B][:ndim]
    return np.ndarray(shape, dtype, buffer=buf, offset=offset)


def put_answer(buf, request_bytes: int, arrays: tuple[np.ndarray, ...]) -> bool:
    """Write an answer's arrays after the request in its slot; False when they do not fit."""
    offset = response_offset(request_bytes)
    ends = offset + sum(align(a.nbytes) for a in arrays)
    if ends > len(buf):
        return False
    for a in arrays:
        put(buf, np.ascontiguousarray(a), offset)
        offset += align(a.nbytes)
    return True


def read_answer(buf, request_bytes: int, fields: tuple) -> tuple[np.ndarray, ...]:
    """The arrays of a RESULT record, copied out of the slot (which is then free)."""
    offset = response_offset(request_bytes)
    a = view(buf, fields, "a", offset).copy()
    if not fields[NDIM_B]:
        return (a,)
    return a, view(buf, fields, "b", offset + align(a.nbytes)).copy()


class Slot(NamedTuple):
    index: int  # NO_SLOT: a segment of its own
    buf: memoryview
    seg: str  # that segment's name
    shm: shared_memory.SharedMemory | None


class Ring:
    """A worker's slots, in one shared-memory segment; thread-safe (the event loop and the dense
    pipelines' threads take slots). The most recently freed slot is taken first, so light load touches
    few pages of a large ring."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.shm = shared_memory.SharedMemory(create=True, size=slots * slot_bytes)
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.shm.name

    def take(self, nbytes: int) -> Slot:
        if nbytes <= self.slot_bytes:
            with self._lock:
                index = self._free.pop() if self._free else None
            if index is not None:
                start = index * self.slot_bytes
                return Slot(index, self.shm.buf[start : start + self.slot_bytes], "", None)
        shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        return Slot(NO_SLOT, shm.buf, shm.name, shm)

    def give(self, slot: Slot) -> None:
        slot.buf.release()
        if slot.shm is None:
            with self._lock:
                self._free.append(slot.index)
            return
        slot.shm.close()
        slot.shm.unlink()

    def close(self) -> None:
        """Unlink now (the name goes; the memory once nothing maps it)."""
        self.shm.unlink()
        try:
            self.shm.close()
        except BufferError:  # a slot still held by a caller that never got its answer
            pass


def attach(name: str) -> memoryview:
    """Map a segment another process created, without taking ownership: Python 3.11's SharedMemory
    registers attached segments with this process's resource tracker, which would unlink the worker's
    ring when the engine exits. Linux: POSIX shared memory lives in /dev/shm. The mapping stays as
    long as a view of it does (a batch still running on a dead worker's slot)."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        return memoryview(mmap.mmap(fd, 0))
    finally:
        os.close(fd)


class Channel:
    """One Unix socket, framed in records: send() from any thread, or queue() records and flush() them
    in one send; parse() what recv() returned."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._outbox: list[bytes] = []

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def queue(self, data: bytes) -> None:
        with self._send_lock:
            self._outbox.append(data)

    def flush(self) -> None:
        with self._send_lock:
            if self._outbox:
                data = b"".join(self._outbox)
                self._outbox.clear()
                self.sock.sendall(data)

    def parse(self, data: bytes) -> list[tuple[tuple, bytes]]:
        buffer = self._buffer
        buffer += data
        out, at, size = [], 0, RECORD.size
        while len(buffer) - at >= size:
            fields = RECORD.unpack_from(buffer, at)
            end = at + size + fields[PAYLOAD]
            if end > len(buffer):
                break
            out.append((fields, bytes(buffer[at + size : end]) if fields[PAYLOAD] else b""))
            at = end
        del buffer[:at]
        return out

    def receive(self) -> tuple[tuple, bytes]:
        """One record, blocking (connection set-up and control calls)."""
        while True:
            got = self.parse(b"")
            if got:
                if len(got) > 1:  # put the rest back
                    rest = b"".join(RECORD.pack(*f) + p for f, p in got[1:])
                    self._buffer[:0] = rest
                return got[0]
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the engine process closed the connection")
            self._buffer += data
