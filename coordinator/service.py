"""The gRPC Sync service: validates every request, commits before acknowledging, maps errors to codes."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np

from coordinator.aggregator import Aggregator, encoded_delta
from coordinator.metrics import CoordinatorMetrics, NullMetrics
from coordinator.store import CoordinatorStore, EventColumns, StoreError
from coordinator.uploads import PartialUploads, UploadSuperseded
from fedsync.aggregation import DeltaRejected, validate_delta
from fedsync.codecs import CodecError, get_codec
from fedsync.manifest import Manifest
from fedsync.v1 import sync_pb2 as pb
from fedsync.v1.sync_pb2_grpc import SyncServicer
from fedsync.wire import DEVICE_METADATA_KEY, INPUT_HASH_BYTES, valid_device_id

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
MAX_DELTA_BYTES = 256 << 20
MAX_EVENTS_PER_BATCH = 65_536
MAX_CORRECTIONS_PER_PAGE = 10_000
INT64_MAX = 2**63 - 1  # SQLite integers are signed 64-bit
_HASH_DTYPE = np.dtype(f"V{INPUT_HASH_BYTES}")  # "S" would strip trailing zero bytes
_STORE_CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "precondition": grpc.StatusCode.FAILED_PRECONDITION}


class Refused(Exception):
    """A request turned down: the status code and message its call answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeltaRefused(Refused):
    """A delta refused for its content and recorded so: a retransmission gets the same answer."""

    def __init__(self, message: str, seq: int, high_water: int) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.seq = seq
        self.high_water = high_water


def device_of(context: grpc.ServicerContext) -> str:
    metadata = dict(context.invocation_metadata())
    device_id = metadata.get(DEVICE_METADATA_KEY, "")
    if not isinstance(device_id, str) or not valid_device_id(device_id):
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"missing or malformed '{DEVICE_METADATA_KEY}' metadata (1-64 of A-Z a-z 0-9 . _ -)",
        )
    return device_id


def _payload_pieces(chunks: Iterator[pb.DeltaChunk]) -> Iterator[bytes]:
    """The data of the chunks after the header."""
    for chunk in chunks:
        if chunk.WhichOneof("part") != "data":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "only the first DeltaChunk may carry a header")
        yield chunk.data  # each access to a bytes field copies it


def _whole_payload(pieces: Iterator[bytes], size: int) -> tuple[bytes | None, Iterator[bytes]]:
    """(payload, no pieces) when the stream holds exactly one piece of `size` bytes, else (None,
    every piece, those already read first)."""
    first = next(pieces, None)
    if first is None:
        return None, pieces
    if len(first) != size:
        return None, itertools.chain((first,), pieces)
    second = next(pieces, None)  # the end of the stream, in the common case
    if second is not None:
        return None, itertools.chain((first, second), pieces)
    return first, pieces


class SyncService(SyncServicer):
    def __init__(
        self,
        store: CoordinatorStore,
        aggregator: Aggregator,
        models_dir: Path,
        on_delta: Callable[[], None] = lambda: None,
        metrics: CoordinatorMetrics | None = None,
        uploads_dir: Path | None = None,
        max_delta_norm: float | None = None,
    ) -> None:
        self.max_delta_norm = max_delta_norm
        self.metrics = metrics or NullMetrics()
        self.store = store
        self.aggregator = aggregator
        self.models_dir = Path(models_dir)
        self.uploads = PartialUploads(uploads_dir or self.models_dir.parent / "uploads")
        self.on_delta = on_delta

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        device = device_of(context)
        if request.model_version > INT64_MAX:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model_version {request.model_version} is out of range")
        version, manifest_json = self.aggregator.published
        offered = version if version > request.model_version else 0
        marks = self.store.touch_device(device, request.model_version, offered)
        response = pb.HelloResponse(
            events_high_water=marks.events_high_water,
            deltas_high_water=marks.deltas_high_water,
            current_model_version=version,
            corrections_cursor=marks.corrections_cursor,
            current_manifest_json=manifest_json if offered else b"",
        )
        # What the client sent along is applied as PushEvents and PushWholeDelta would; what fails
        # a transfer check stays unapplied, for the regular call to report precisely.
        if request.HasField("events"):
            try:
                events_ack = self._apply_event_batch(device, request.events)
            except Refused as exc:
                log.debug("events sent with Hello by %s left to PushEvents: %s", device, exc.message)
            else:
                response.events_ack.CopyFrom(events_ack)
                response.events_high_water = events_ack.high_water
                response.corrections_cursor = max(response.corrections_cursor, events_ack.corrections_cursor)
        if request.HasField("delta"):
            delta_ack = self._carried_delta(device, request.delta)
            if delta_ack is not None:
                response.delta_ack.CopyFrom(delta_ack)
                response.deltas_high_water = max(response.deltas_high_water, delta_ack.deltas_high_water)
        partial = self.uploads.status(device)
        if partial is not None and partial.seq == response.deltas_high_water + 1:
            response.delta_resume_offset = partial.received
            response.delta_resume_sha256 = partial.sha256
        return response

    def _carried_delta(self, device: str, delta: pb.WholeDelta) -> pb.DeltaAck | None:
        try:
            return self._whole_delta(device, delta)
        except DeltaRefused as exc:
            return pb.DeltaAck(
                seq=exc.seq, status=pb.DeltaAck.REJECTED, reason=exc.message, deltas_high_water=exc.high_water
            )
        except Refused as exc:
            log.debug("delta sent with Hello by %s left to PushWholeDelta: %s", device, exc.message)
            return None

    def PushEvents(
        self, request_iterator: Iterator[pb.EventBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.EventAck]:
        device = device_of(context)
        for batch in request_iterator:
            try:
                ack = self._apply_event_batch(device, batch)
            except Refused as exc:
                context.abort(exc.code, exc.message)
            yield ack

    def _apply_event_batch(self, device: str, batch: pb.EventBatch) -> pb.EventAck:
        n = len(batch.seq)
        if n > MAX_EVENTS_PER_BATCH:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"batch of {n} events exceeds the limit of {MAX_EVENTS_PER_BATCH}"
            )
        hashes = batch.input_hashes
        if len(hashes) != INPUT_HASH_BYTES * n:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input_hashes must hold {INPUT_HASH_BYTES} bytes for each of the {n} events, got {len(hashes)}",
            )
        columns = [batch.labels, batch.confidences, batch.model_versions, batch.latencies_us, batch.times_unix_ns]
        if any(len(column) != n for column in columns):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "event batch columns must all have one entry an event")
        # Packed repeated fields convert to arrays without a copy per element.
        rows = EventColumns.from_arrays(
            np.array(batch.seq, dtype=np.uint64),
            np.frombuffer(hashes, dtype=_HASH_DTYPE).tolist(),  # bytes objects, 5x faster than slicing
            np.array(batch.labels, dtype=np.int64),
            np.array(batch.confidences, dtype=np.float64),
            np.array(batch.model_versions, dtype=np.uint64),
            np.array(batch.latencies_us, dtype=np.float64),
            np.array(batch.times_unix_ns, dtype=np.int64),
        )
        try:
            result = self.store.add_events(device, rows)
        except StoreError as exc:
            raise Refused(_STORE_CODES[exc.kind], str(exc)) from None
        if result.conflicts_touched:
            self.metrics.conflicts_resolved(result.conflicts_touched)
        return pb.EventAck(
            high_water=result.high_water,
            accepted=result.accepted,
            duplicates=result.duplicates,
            corrections_cursor=result.corrections_cursor,
        )

    def PushDelta(self, request_iterator: Iterator[pb.DeltaChunk], context: grpc.ServicerContext) -> pb.DeltaAck:
        device = device_of(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first DeltaChunk must carry the header")
        try:
            return self._push_delta(device, first.header, request_iterator)
        except Refused as exc:
            context.abort(exc.code, exc.message)

    def _push_delta(
        self,
        device: str,
        header: pb.DeltaHeader,
        request_iterator: Iterator[pb.DeltaChunk],
    ) -> pb.DeltaAck:
        replayed = self._admit_header(device, header)
        if replayed is not None:
            return replayed
        pieces = _payload_pieces(request_iterator)
        if header.offset == 0:
            whole, pieces = _whole_payload(pieces, header.payload_size)
            if whole is not None:
                return self._push_whole_delta(device, header, whole)
        try:
            upload = self.uploads.begin(device, header.seq, header.payload_sha256, header.payload_size, header.offset)
        except ValueError as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}: start again at offset 0") from None
        received = upload.received
        digest = self.uploads.prefix_hash(device) if received else hashlib.sha256()
        try:
            with self.uploads.appender(device, upload, digest) as append:
                for data in pieces:
                    if received + len(data) > header.payload_size:
                        self.uploads.discard(device)
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "delta payload is longer than its header says")
                    append(data)
                    received += len(data)
        except UploadSuperseded as exc:
            raise Refused(grpc.StatusCode.ABORTED, str(exc)) from None
        if received != header.payload_size:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"delta payload ended after {received} of {header.payload_size} bytes (resume at {received})",
            )
        if digest.digest() != header.payload_sha256:
            self.uploads.discard(device)
            raise Refused(grpc.StatusCode.DATA_LOSS, "delta payload does not match its sha256")
        payload = self.uploads.payload(device)
        try:
            return self._store_delta(device, header, payload, self.uploads.part_file(device))
        finally:
            self.uploads.discard(device)

    def PushWholeDelta(self, request: pb.WholeDelta, context: grpc.ServicerContext) -> pb.DeltaAck:
        device = device_of(context)
        try:
            return self._whole_delta(device, request)
        except Refused as exc:
            context.abort(exc.code, exc.message)

    def _whole_delta(self, device: str, request: pb.WholeDelta) -> pb.DeltaAck:
        header = request.header
        replayed = self._admit_header(device, header)
        if replayed is not None:
            return replayed
        if header.offset != 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a whole delta starts at offset 0, not {header.offset}")
        if len(request.payload) != header.payload_size:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"payload of {len(request.payload)} bytes, but the header says {header.payload_size}",
            )
        return self._push_whole_delta(device, header, request.payload)

    def _admit_header(self, device: str, header: pb.DeltaHeader) -> pb.DeltaAck | None:
        """The checks every upload path makes on a header; the answer to a replay of a stored delta."""
        if header.payload_size > MAX_DELTA_BYTES:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"delta of {header.payload_size} bytes exceeds the limit of {MAX_DELTA_BYTES}",
            )
        for field in ("seq", "base_version", "num_examples"):
            if getattr(header, field) > INT64_MAX:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field} {getattr(header, field)} is out of range")
        if not math.isfinite(header.train_loss):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"train_loss must be finite, got {header.train_loss}")
        _, deltas_hw = self.store.high_waters(device)
        if header.seq <= deltas_hw:
            return self._replayed_delta(device, header, deltas_hw)
        if header.seq != deltas_hw + 1:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"sequence gap: expected delta {deltas_hw + 1}, got {header.seq}"
            )
        if len(header.payload_sha256) != 32:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "payload_sha256 must be 32 bytes")
        return None

    def _push_whole_delta(self, device: str, header: pb.DeltaHeader, payload: bytes) -> pb.DeltaAck:
        """A delta whose payload came in one piece: no partial upload on disk, no writer thread.
        Leaves the device's upload state as the chunked path would: begin() at offset 0 then
        discard() (which also stops an earlier cut stream of the device from appending)."""
        self.uploads.discard(device)
        if hashlib.sha256(payload).digest() != header.payload_sha256:
            raise Refused(grpc.StatusCode.DATA_LOSS, "delta payload does not match its sha256")
        return self._store_delta(device, header, payload)

    def _replayed_delta(self, device: str, header: pb.DeltaHeader, deltas_hw: int) -> pb.DeltaAck:
        stored = self.store.delta_status(device, header.seq)
        if stored is None or stored[2] != header.payload_sha256:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"delta {header.seq} was already stored with different content: refusing the replay",
            )
        status = pb.DeltaAck.REJECTED if stored[0] == "rejected" else pb.DeltaAck.DUPLICATE
        return pb.DeltaAck(seq=header.seq, status=status, reason=stored[1], deltas_high_water=deltas_hw)

    def _store_delta(
        self,
        device: str,
        header: pb.DeltaHeader,
        payload: bytes,
        payload_file: Path | None = None,
    ) -> pb.DeltaAck:
        """Validate and store a complete delta; payload_file (its bytes on disk) is moved into the store."""
        specs_json = json.dumps([{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in header.tensors])
        staleness = self.aggregator.staleness_of(header.base_version)
        common = dict(
            device_id=device,
            seq=header.seq,
            base_version=header.base_version,
            num_examples=header.num_examples,
            codec=header.codec,
            tensor_specs=specs_json,
            payload_sha256=header.payload_sha256,
            train_loss=header.train_loss,
            staleness=staleness,
        )
        problem = self._delta_problem(header, specs_json, payload, staleness)
        try:
            if problem is not None:
                # Record the refusal durably so a retransmission gets the same answer.
                hw = self.store.add_delta(**common, payload=None, status="rejected", reason=problem[1])
                self.metrics.delta_rejected(problem[0])
                raise DeltaRefused(f"delta {header.seq} rejected: {problem[1]}", header.seq, hw)
            reason = self.aggregator.strategy.accepts(staleness)
            status = "rejected" if reason else "buffered"
            hw = self.store.add_delta(
                **common,
                payload=None if payload_file is not None or reason else payload,
                payload_file=None if reason else payload_file,
                status=status,
                reason=reason or "",
            )
        except StoreError as exc:
            raise Refused(_STORE_CODES[exc.kind], str(exc)) from None
        if reason:
            self.metrics.delta_rejected(reason)
            return pb.DeltaAck(
                seq=header.seq,
                status=pb.DeltaAck.REJECTED,
                reason=f"{reason} (staleness {staleness})",
                deltas_high_water=hw,
            )
        self.metrics.delta_accepted(staleness)
        self.on_delta()
        return pb.DeltaAck(seq=header.seq, status=pb.DeltaAck.ACCEPTED, deltas_high_water=hw)

    def _delta_problem(
        self, header: pb.DeltaHeader, specs_json: str, payload: bytes, staleness: int
    ) -> tuple[str, str] | None:
        """(reason, message) when the delta must be refused, else None."""
        if header.num_examples == 0:
            return "no_examples", "num_examples must be positive"
        if staleness < 0:
            return "future_base", (
                f"base version {header.base_version} is newer than the current version {self.aggregator.version}"
            )
        try:
            get_codec(header.codec)
            delta = encoded_delta(header.codec, specs_json, payload)
            delta.check()
            reference = self.aggregator.reference_weights()
            names = set(delta.shapes())
            # A delta may cover a subset of the model (a lean client trains only the head).
            if names and names <= set(reference):
                reference = {name: reference[name] for name in names}
            validate_delta(delta, reference, max_norm=self.max_delta_norm)
        except (CodecError, ValueError) as exc:
            return "codec", f"codec: {exc}"
        except DeltaRejected as exc:
            return exc.reason, str(exc)
        return None

    def PullCorrections(
        self, request: pb.PullCorrectionsRequest, context: grpc.ServicerContext
    ) -> pb.PullCorrectionsResponse:
        device = device_of(context)
        limit = min(request.limit or 1000, MAX_CORRECTIONS_PER_PAGE)
        rows = self.store.corrections_after(device, request.after_cursor, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        self.metrics.corrections_sent(len(rows))
        return pb.PullCorrectionsResponse(
            corrections=[
                pb.Correction(
                    cursor=r.cursor,
                    input_hash=r.input_hash,
                    label=r.label,
                    confidence=r.confidence,
                    model_version=r.model_version,
                )
                for r in rows
            ],
            cursor=rows[-1].cursor if rows else request.after_cursor,
            more=more,
        )

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        device_of(context)
        version, manifest_json = self.aggregator.published
        return pb.ModelInfo(version=version, manifest_json=manifest_json)

    def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ArtifactChunk]:
        device_of(context)
        version_dir = self.models_dir / f"v{request.version}"
        manifest_path = version_dir / "manifest.json"
        if not manifest_path.exists():
            context.abort(grpc.StatusCode.NOT_FOUND, f"model version {request.version} is not published")
        manifest = Manifest.from_json(manifest_path.read_bytes())
        if request.name not in {a.name for a in manifest.artifacts}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} has no artifact {request.name!r}")
        path = version_dir / request.name
        total = path.stat().st_size
        if request.offset > total:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({total} bytes)")
        chunk_size = min(request.chunk_size or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while data := f.read(chunk_size):
                yield pb.ArtifactChunk(offset=offset, data=data, total_size=total)
                offset += len(data)
