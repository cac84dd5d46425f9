"""One sync session with a coordinator: push pending events and deltas, pull corrections and the model.

Order matters for exactly-once: the client resumes from the coordinator's durable high-water
marks (Hello), and advances its own acknowledged marks only from the coordinator's acks, which
are sent after the coordinator's commit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from client.journal import Journal, JournalDelta
from client.model_store import InstallError
from client.predictions import PredictionCache, StoredCorrection
from fedsync.manifest import Artifact
from fedsync.v1 import sync_pb2 as pb
from fedsync.v1.sync_pb2_grpc import SyncStub
from fedsync.wire import call_metadata, open_channel

if TYPE_CHECKING:
    from client.edge import EdgeClient

EVENT_BATCH_SIZE = 8192
EVENT_WINDOW = 8  # batches in flight before waiting for acks: bounds memory and resend cost
# Under the 4 MiB default message limit; 2 MiB measured steadier and faster than 1 MiB on loopback.
# A resumed upload starts at the coordinator's byte offset: it resends no chunk the coordinator has.
DELTA_CHUNK_BYTES = 2 << 20
# Reading deltas memory-mapped is several times faster (a payload spans thousands of overflow
# pages, each one read() otherwise), but an I/O error of the storage under a mapping kills the
# process with SIGBUS instead of raising. Edge storage (SD cards) fails like that, so it is off;
# set it (e.g. 1 << 30) where the storage is trusted. About 30 ms per 50 MB uploaded.
JOURNAL_MMAP_BYTES = 0
# Pending work that fits one message rides the Hello (one round trip for a whole sync); False sends
# it by the regular calls only, as a client of an older coordinator ends up doing anyway.
HELLO_CARRIES_PENDING = True
DOWNLOAD_WRITES_AHEAD = 4  # chunks received but not yet written, at most
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


@dataclass
class SyncReport:
    events_sent: int = 0
    events_duplicates: int = 0
    deltas_sent: int = 0
    deltas_rejected: int = 0
    corrections_applied: int = 0
    model_version: int = 0
    installed_version: int | None = None
    install_error: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_shared: int = 0  # artifact bytes linked from the host's shared cache instead of downloaded
    resumed_delta_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class StalledError(grpc.RpcError):
    """A stream made no progress for the call timeout and was cancelled (retryable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self.message


class _ProgressWatchdog:
    """Calls `on_stall` when `progress()` has not been called for `timeout_s`."""

    def __init__(self, timeout_s: float, on_stall: Callable[[], object]) -> None:
        self.timeout_s = timeout_s
        self.on_stall = on_stall
        self.fired = False
        self._progress = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self._progress.set()

    def stop(self) -> None:
        self._stopped.set()
        self._progress.set()

    def _watch(self) -> None:
        while not self._stopped.is_set():
            if not self._progress.wait(self.timeout_s):
                self.fired = True
                self.on_stall()
                return
            self._progress.clear()


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE


def sync_with_retries(client: EdgeClient, address: str, *, timeout_s: float, attempts: int) -> SyncReport:
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(initial=0.1, max=5.0),
        retry=retry_if_exception(_is_retryable),
        reraise=True,
    )
    return retrying(sync_once, client, address, timeout_s=timeout_s)


def sync_once(client: EdgeClient, address: str, *, timeout_s: float = 30.0) -> SyncReport:
    client.before_sync()
    session: _Session | None = None
    try:
        with open_channel(address, client.tls) as channel:
            session = _Session(client, SyncStub(channel), timeout_s)
            return session.run()
    finally:
        client.after_sync(corrections_applied=session is None or session.report.corrections_applied > 0)


class _Session:
    def __init__(self, client: EdgeClient, stub: SyncStub, timeout_s: float) -> None:
        self.client = client
        self.stub = stub
        self.timeout_s = timeout_s
        self.metadata = call_metadata(client.device_id, client.credential)
        self.report = SyncReport()
        self.corrections_waiting = 0  # the newest correction cursor the coordinator has told of
        self.events_acked = 0  # the journal's marks as this session last read or moved them
        self.deltas_acked = 0
        # Its own connection, so inference and fine-tuning go on while the sync runs.
        self.journal = self._open_journal(mmap=True)

    def _open_journal(self, *, mmap: bool = False) -> Journal:
        journal = Journal(self.client.journal.path, self.client.journal.durability, create=False)
        if mmap and JOURNAL_MMAP_BYTES:
            journal.conn.execute(f"PRAGMA mmap_size = {JOURNAL_MMAP_BYTES}")
        return journal

    def run(self) -> SyncReport:
        try:
            return self._run()
        finally:
            self.journal.close()

    def _run(self) -> SyncReport:
        journal = self.journal
        self.events_acked, self.deltas_acked = journal.events_acked(), journal.deltas_acked()
        last_event = journal.last_event_seq()
        request = pb.HelloRequest(model_version=self.client.model_version, client_version="fedsync/0.1")
        pending_deltas = list(itertools.islice(journal.pending_delta_headers(self.deltas_acked), 2))
        last_delta = int(pending_deltas[-1][0].seq) if pending_deltas else self.deltas_acked
        carried_delta = self._carry(request, last_event, pending_deltas)
        hello = self.stub.Hello(request, metadata=self.metadata, timeout=self.timeout_s)
        if hello.HasField("events_ack"):
            self._take_event_ack(hello.events_ack)
        if hello.HasField("delta_ack") and carried_delta is not None:
            self._take_delta_ack(carried_delta, hello.delta_ack)
        # An ack may have been lost after the coordinator's commit: its marks are the truth.
        if hello.events_high_water > self.events_acked:
            journal.ack_events(hello.events_high_water)
            self.events_acked = hello.events_high_water
        self.corrections_waiting = hello.corrections_cursor
        if last_event > hello.events_high_water:
            self._push_events(hello.events_high_water)
        for seq in range(self.deltas_acked + 1, hello.deltas_high_water + 1):
            journal.ack_delta(seq, "sent")  # stored by the coordinator, ack lost (accepted or rejected there)
            self.deltas_acked = seq
        # What this sync found pending is all stored when the mark covers the last of it.
        if len(pending_deltas) > 1 or hello.deltas_high_water < last_delta:
            self._push_deltas(hello.deltas_high_water, hello.delta_resume_offset, hello.delta_resume_sha256)
        # Hello (and the event acks, for corrections this sync's own events caused) says whether
        # there is anything to pull: most syncs then skip one or both calls.
        if self.corrections_waiting and self.corrections_waiting > journal.get_meta("corrections_cursor"):
            self._pull_corrections()
        if hello.current_model_version > self.client.model_version:
            self._pull_model(hello)
        self.report.model_version = self.client.model_version
        return self.report

    def _carry(
        self, request: pb.HelloRequest, last_event: int, pending_deltas: list[tuple[JournalDelta, int]]
    ) -> int | None:
        """Put what is pending into the Hello when it fits one message: the pending events when they
        make one batch, the next delta when its payload is one chunk. Returns the carried delta's
        seq. Whatever the coordinator does not take goes again by the regular calls below."""
        if not HELLO_CARRIES_PENDING:
            return None
        journal = self.journal
        if 0 < last_event - self.events_acked <= EVENT_BATCH_SIZE:
            columns = next(journal.iter_event_columns(self.events_acked, EVENT_BATCH_SIZE), None)
            if columns is not None:
                request.events.CopyFrom(self._event_batch(columns))
        if not pending_deltas or pending_deltas[0][1] > DELTA_CHUNK_BYTES:
            return None
        delta, payload_size = pending_deltas[0]
        request.delta.header.CopyFrom(self._delta_header(delta, payload_size, 0))
        request.delta.payload = b"".join(journal.read_payload(delta.seq, 0, DELTA_CHUNK_BYTES))
        self.report.bytes_up += payload_size
        return int(delta.seq)

    # -- events --------------------------------------------------------------------------

    def _push_events(self, high_water: int) -> None:
        if self.journal.last_event_seq() - high_water <= EVENT_BATCH_SIZE:
            self._push_event_batch(high_water)
            return
        window = threading.Semaphore(EVENT_WINDOW)
        failures: queue.SimpleQueue[BaseException] = queue.SimpleQueue()
        stop = threading.Event()

        def batches() -> Iterator[pb.EventBatch]:
            reader = self._open_journal()  # gRPC reads this in its own thread
            try:
                for columns in reader.iter_event_columns(high_water, EVENT_BATCH_SIZE):
                    while not window.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    yield self._event_batch(columns)
            except BaseException as exc:  # surfaced to the caller below
                failures.put(exc)
            finally:
                reader.close()

        # No overall deadline (a large backlog takes long), but a stream that makes no progress for
        # timeout_s is cancelled: a stalled link must not hold the sync for minutes.
        responses = self.stub.PushEvents(batches(), metadata=self.metadata)
        watchdog = _ProgressWatchdog(self.timeout_s, responses.cancel)
        try:
            for ack in responses:
                watchdog.progress()
                self._take_event_ack(ack)
                window.release()
        except grpc.RpcError as exc:
            if watchdog.fired and exc.code() == grpc.StatusCode.CANCELLED:
                raise StalledError(f"no acknowledgement for {self.timeout_s:.0f} s: the link stalled") from None
            raise
        finally:
            watchdog.stop()
            stop.set()
        if not failures.empty():
            raise failures.get()

    def _push_event_batch(self, high_water: int) -> None:
        """What fits one batch goes as a one-message stream with a deadline: no reader connection
        of its own, no watchdog thread (the common case: a device syncs what it did since last time)."""
        journal = self.journal
        columns = next(journal.iter_event_columns(high_water, EVENT_BATCH_SIZE), None)
        if columns is None:
            return
        message = self._event_batch(columns)
        responses = self.stub.PushEvents(iter([message]), metadata=self.metadata, timeout=self.timeout_s)
        for ack in responses:
            self._take_event_ack(ack)

    def _take_event_ack(self, ack: pb.EventAck) -> None:
        self.journal.ack_events(ack.high_water)
        self.events_acked = max(self.events_acked, ack.high_water)
        self.corrections_waiting = max(self.corrections_waiting, ack.corrections_cursor)
        self.report.events_sent += ack.accepted
        self.report.events_duplicates += ack.duplicates

    def _event_batch(self, columns: list[list]) -> pb.EventBatch:
        seqs, hashes, labels, confidences, versions, latencies, times = columns
        message = pb.EventBatch(
            seq=seqs,
            input_hashes=b"".join(hashes),
            labels=labels,
            confidences=confidences,
            model_versions=versions,
            latencies_us=[latency or 0.0 for latency in latencies],
            times_unix_ns=times,
        )
        self.report.bytes_up += message.ByteSize()
        return message

    # -- deltas --------------------------------------------------------------------------

    def _push_deltas(self, high_water: int, resume_offset: int, resume_sha256: bytes) -> None:
        journal = self.journal
        for delta, payload_size in journal.pending_delta_headers(high_water):
            offset = 0
            if delta.seq == high_water + 1 and resume_sha256 == delta.payload_sha256:
                offset = min(resume_offset, payload_size)
                self.report.resumed_delta_bytes += offset
            header = self._delta_header(delta, payload_size, offset)

            def chunks(header: pb.DeltaHeader = header, offset: int = offset) -> Iterator[pb.DeltaChunk]:
                yield pb.DeltaChunk(header=header)
                reader = self._open_journal(mmap=True)  # read in gRPC's thread
                try:
                    for chunk in reader.read_payload(header.seq, offset, DELTA_CHUNK_BYTES):
                        self.report.bytes_up += len(chunk)
                        yield pb.DeltaChunk(data=chunk)
                finally:
                    reader.close()

            try:
                if offset == 0 and payload_size <= DELTA_CHUNK_BYTES:
                    # Most deltas: one unary call with the payload read here, on the session's
                    # connection (a stream costs a request thread and a reader connection).
                    payload = b"".join(journal.read_payload(delta.seq, 0, DELTA_CHUNK_BYTES))
                    self.report.bytes_up += len(payload)
                    whole = pb.WholeDelta(header=header, payload=payload)
                    ack = self.stub.PushWholeDelta(whole, metadata=self.metadata, timeout=self.timeout_s)
                else:
                    ack = self.stub.PushDelta(chunks(), metadata=self.metadata, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                # A refused content is recorded by the coordinator (its mark moves past the delta);
                # a malformed transfer is not, and must not be skipped.
                hello = self.stub.Hello(
                    pb.HelloRequest(model_version=self.client.model_version),
                    metadata=self.metadata,
                    timeout=self.timeout_s,
                )
                if hello.deltas_high_water < delta.seq:
                    raise
                journal.ack_delta(delta.seq, "rejected", exc.details() or "")
                self.report.deltas_rejected += 1
                self.report.notes.append(exc.details() or f"delta {delta.seq} rejected")
                continue
            self._take_delta_ack(delta.seq, ack)

    @staticmethod
    def _delta_header(delta: JournalDelta, payload_size: int, offset: int) -> pb.DeltaHeader:
        specs = [
            pb.TensorSpec(name=s["name"], shape=s["shape"], dtype=s["dtype"]) for s in json.loads(delta.tensor_specs)
        ]
        return pb.DeltaHeader(
            seq=delta.seq,
            base_version=delta.base_version,
            num_examples=delta.num_examples,
            codec=delta.codec,
            tensors=specs,
            payload_size=payload_size,
            payload_sha256=delta.payload_sha256,
            train_loss=delta.train_loss,
            offset=offset,
        )

    def _take_delta_ack(self, seq: int, ack: pb.DeltaAck) -> None:
        self.deltas_acked = max(self.deltas_acked, seq)
        if ack.status == pb.DeltaAck.REJECTED:
            self.journal.ack_delta(seq, "rejected", ack.reason)
            self.report.deltas_rejected += 1
            self.report.notes.append(ack.reason or f"delta {seq} rejected")
        else:
            self.journal.ack_delta(seq, "sent")
            self.report.deltas_sent += ack.status == pb.DeltaAck.ACCEPTED

    # -- corrections ---------------------------------------------------------------------

    def _pull_corrections(self) -> None:
        journal = self.journal
        cache = PredictionCache(journal.conn)
        cursor = journal.get_meta("corrections_cursor")
        while True:
            response = self.stub.PullCorrections(
                pb.PullCorrectionsRequest(after_cursor=cursor, limit=1000),
                metadata=self.metadata,
                timeout=self.timeout_s,
            )
            self.report.bytes_down += response.ByteSize()
            with journal.transaction():
                for c in response.corrections:
                    cache.apply_correction(
                        StoredCorrection(c.input_hash, c.label, c.confidence, c.model_version, c.cursor)
                    )
                cursor = max(cursor, response.cursor)
                journal.set_meta("corrections_cursor", cursor)
            self.report.corrections_applied += len(response.corrections)
            if not response.more:
                return

    # -- model ---------------------------------------------------------------------------

    def _pull_model(self, hello: pb.HelloResponse) -> None:
        # Hello brings the manifest of a newer version (and the coordinator keeps that version for
        # this device); a coordinator that does not is asked, and told what was installed.
        offered = bool(hello.current_manifest_json)
        if offered:
            version, manifest_json = hello.current_model_version, hello.current_manifest_json
        else:
            info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=self.timeout_s)
            version, manifest_json = info.version, info.manifest_json
        if version == 0 or version <= self.client.model_version:
            return
        models = self.client.models
        shared_before = models.shared_bytes
        try:
            installed = models.install(
                manifest_json,
                fetch=lambda artifact, path: self._download(version, artifact, path),
                smoke_test=self.client.smoke_test,
                kinds=self.client.wanted_artifact_kinds(),
            )
        except InstallError as exc:
            self.report.install_error = str(exc)
            return
        finally:
            self.report.bytes_shared += models.shared_bytes - shared_before
        self.report.installed_version = installed
        self.client.reload_model()
        if not offered:  # tell the coordinator which version this device now runs: it keeps it published
            self.stub.Hello(
                pb.HelloRequest(model_version=installed, client_version="fedsync/0.1"),
                metadata=self.metadata,
                timeout=self.timeout_s,
            )

    def _download(self, version: int, artifact: Artifact, path: Path) -> None:
        offset = path.stat().st_size if path.exists() else 0
        if offset > artifact.size:
            path.unlink()
            offset = 0
        request = pb.DownloadArtifactRequest(version=version, name=artifact.name, offset=offset)
        # Chunks are written by a thread of their own, in order, while the next ones arrive: writing
        # to new pages of the page cache can take as long as the transfer. Leaving the block waits
        # for the writes, so a cut download keeps every chunk it received.
        # A download that comes in one chunk (most models) is written here, without the thread.
        with open(path, "ab", buffering=0) as f, contextlib.ExitStack() as stack:
            writer: ThreadPoolExecutor | None = None
            writes: deque[Future[None]] = deque()
            for chunk in self.stub.DownloadArtifact(request, metadata=self.metadata, timeout=self.timeout_s):
                if chunk.offset != offset:
                    raise InstallError(f"{artifact.name}: chunk at offset {chunk.offset}, expected {offset}")
                data = chunk.data  # each access to a bytes field copies it
                offset += len(data)
                self.report.bytes_down += len(data)
                if writer is None and offset >= artifact.size:
                    _write_all(f, data)
                    continue
                if writer is None:
                    writer = stack.enter_context(ThreadPoolExecutor(1, "fedsync-download"))
                writes.append(writer.submit(_write_all, f, data))
                if len(writes) > DOWNLOAD_WRITES_AHEAD:
                    writes.popleft().result()
            for write in writes:
                write.result()


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]
