"""DiskTier: a persistent KV tier on local disk that survives restarts and is shared by replicas.

What is stored: blocks of ``block_size`` tokens at block-aligned positions of a prompt. A block's name is
a chained hash: ``h_0 = sha256(model identity, namespace)``, ``h_b = sha256(h_{b-1}, tokens of block b-1)``
over int32 token ids. So a block names its whole token prefix, the model (path, dtype, KV shape, codec
and a fingerprint of the weight files) and the cache namespace (``namespace``: the request's
``cache_salt``/``extra_key`` when the tree has namespaces; "" otherwise), and one tenant's prefix can
never serve another's.

A file is ``MAGIC | u32 header length | msgpack BlockHeader | payload``; the header carries the block's
own token ids, the codec, the shape and a BLAKE2b digest of the payload. Writes go to a temporary file
in the same directory and are published with ``os.replace`` (atomic), so a reader sees a whole block or
none; a torn, truncated or foreign file fails the checks and is a miss (and is deleted), never wrong KV.

Writes run on a background thread (a bounded queue: when it is full a block is skipped, it is a
cache). Reads run on the caller's thread at admission. The directory is bounded (``max_bytes`` over
everything under it): the writer adds its own writes to the size it knows and rescans the directory
at least every ``rescan_s`` seconds (other replicas write there too); after a write that crosses the
bound it deletes the least recently used files (reads refresh a file's mtime) down to 90% of it.
Stale temporary files of crashed writers are removed by the same scan.

Length: a little over 400 lines, kept in one file because the block format, the writer and the reader
must agree byte for byte.

Replicas sharing the directory (several servers, or --dp-size workers, on one machine) need no lock:
a block is published by an atomic rename, so a reader sees a whole block or none; two writers of one
block write the same bytes; a block deleted by another replica's eviction is a read miss; and a
replica that finds a block it did not write (``missing_blocks``) does not write it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import msgspec
import torch

from radixlm.runtime.kv_tiers.codec import KVCodec

logger = logging.getLogger(__name__)

MAGIC = b"RLMKV\x00\x01\x00"
VERSION = 1
_SUFFIX = ".kv"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 120.0  # a temporary file older than this belongs to a writer that died
_FINGERPRINT_BYTES = 1 << 20  # bytes hashed from each end of every weight file


class BlockHeader(msgspec.Struct, frozen=True):
    version: int
    codec: str
    pool_dtype: str
    shape: list[int]  # [L, 2, block_size, Hkv, D]
    tokens: list[int]
    data_nbytes: int
    scale_nbytes: int
    digest: str  # blake2b-128 of the payload, hex


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(BlockHeader)


def weights_fingerprint(model_path: str) -> str:
    """A cheap fingerprint of a checkpoint: config.json, and each weight file's size and both ends."""
    h = hashlib.sha256()
    root = Path(model_path)
    for name in ("config.json",):
        p = root / name
        if p.exists():
            h.update(p.read_bytes())
    for p in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                f.seek(size - _FINGERPRINT_BYTES)
                h.update(f.read())
    return h.hexdigest()


def model_identity(model_path: str, pool_dtype: torch.dtype, kv_shape: tuple[int, int, int], codec: KVCodec) -> str:
    """What a stored block must match to be used: model path, weights, dtype, KV shape and codec."""
    layers, heads, dim = kv_shape
    return "|".join(
        [
            f"radixlm-kv-v{VERSION}",
            os.path.abspath(model_path),
            weights_fingerprint(model_path),
            str(pool_dtype),
            f"{layers}x{heads}x{dim}",
            codec.name,
        ]
    )


class DiskTier:
    def __init__(
        self,
        root: str,
        identity: str,
        codec: KVCodec,
        kv_shape: tuple[int, int, int],
        block_size: int,
        max_bytes: int,
        queue_size: int = 256,
        rescan_s: float = 2.0,
    ):
        if block_size < 1:
            raise ValueError("hicache_storage_block_size must be >= 1")
        if max_bytes < 1:
            raise ValueError("hicache_storage_size_gb must be > 0")
        self.root = Path(root)
        self._seed = hashlib.sha256(identity.encode()).digest()
        self.dir = self.root / hashlib.sha256(identity.encode()).hexdigest()[:32]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.codec = codec
        self.block_size = block_size
        self.max_bytes = max_bytes
        layers, heads, dim = kv_shape
        self.shape = [layers, 2, block_size, heads, dim]
        self._queued: set[str] = set()  # blocks waiting for the writer (not on disk yet)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # guards the counters and _queued between the two threads
        self.rescan_s = rescan_s  # how stale our view of the directory's size may get (replicas write too)
        self._bytes = self._scan_size()
        self._scanned_at = time.monotonic()
        self.writes = self.write_skips = self.write_errors = 0
        self.reads = self.read_misses = self.corrupt = self.evicted = 0
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="radixlm-kv-disk", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ naming
    def chain(self, key: list[int], num_blocks: int, namespace: str = "") -> list[str]:
        """Names of the first ``num_blocks`` blocks of ``key`` (hex digests of the chained hash)."""
        h = hashlib.sha256(self._seed + b"\x00ns:" + namespace.encode()).digest()
        bs = self.block_size
        out = []
        for b in range(num_blocks):
            h = hashlib.sha256(h + _token_bytes(key[b * bs : (b + 1) * bs])).digest()
            out.append(h.hex())
        return out

    def path(self, name: str) -> Path:
        return self.dir / name[:2] / (name + _SUFFIX)

    def missing_blocks(self, key: list[int], namespace: str = "") -> Iterator[tuple[int, int, str]]:
        """(start, end, name) of the whole blocks of ``key`` neither on disk nor queued for writing.

        On disk is asked of the directory each time (a stat), not remembered: another replica's
        eviction may have removed a block we wrote or read, and then we write it again."""
        bs = self.block_size
        for b, name in enumerate(self.chain(key, len(key) // bs, namespace)):
            with self._lock:
                queued = name in self._queued
            if queued or self.path(name).exists():  # (written by us, another replica or an earlier run)
                continue
            yield b * bs, (b + 1) * bs, name

    # ------------------------------------------------------------------ writes
    def write_async(self, name: str, tokens: list[int], rows: torch.Tensor) -> None:
        """Queue block ``name`` (rows [L, 2, block_size, Hkv, D] on the CPU) for the writer thread."""
        if self._closed:
            return
        with self._lock:
            self._queued.add(name)  # do not queue it twice
        try:
            self._queue.put_nowait((name, list(tokens), rows))
        except queue.Full:
            with self._lock:
                self._queued.discard(name)
                self.write_skips += 1

    def flush(self) -> None:
        """Wait until every queued block has been written."""
        self._queue.join()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                name, tokens, rows = item
                try:
                    size = self._write_block(name, tokens, rows)
                except OSError as e:
                    logger.warning("KV disk tier: writing block %s failed: %s", name[:12], e)
                    with self._lock:
                        self.write_errors += 1
                        self._queued.discard(name)
                    continue
                with self._lock:
                    self.writes += 1
                    self._bytes += size
                    self._queued.discard(name)
                if time.monotonic() - self._scanned_at >= self.rescan_s:
                    total = self._scan_size()  # count what the other replicas wrote meanwhile
                    with self._lock:
                        self._bytes = total
                with self._lock:
                    over = self._bytes > self.max_bytes
                if over:
                    self._evict()
            finally:
                self._queue.task_done()

    def _write_block(self, name: str, tokens: list[int], rows: torch.Tensor) -> int:
        data, scale = self.codec.encode(rows)
        payload = _tensor_bytes(data) + (_tensor_bytes(scale) if scale is not None else b"")
        header = BlockHeader(
            version=VERSION,
            codec=self.codec.name,
            pool_dtype=str(self.codec.pool_dtype),
            shape=list(rows.shape),
            tokens=tokens,
            data_nbytes=data.numel() * data.element_size(),
            scale_nbytes=0 if scale is None else scale.numel() * 4,
            digest=hashlib.blake2b(payload, digest_size=16).hexdigest(),
        )
        head = _encoder.encode(header)
        final = self.path(name)
        final.parent.mkdir(exist_ok=True)
        tmp = final.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(head)) + head)
                f.write(payload)
            os.replace(tmp, final)  # atomic: readers see the whole block or nothing
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(MAGIC) + 4 + len(head) + len(payload)

    # ------------------------------------------------------------------ reads
    def read_run(self, key: list[int], start: int, end: int, namespace: str = "") -> torch.Tensor | None:
        """K/V for ``key[start:e]`` from consecutive blocks (e: the end of the last block found, <= end).

        Returns [L, 2, e - start, Hkv, D] in the pool dtype on the CPU, or None when the block holding
        ``start`` is missing, torn or foreign.
        """
        bs = self.block_size
        first, last = start // bs, end // bs
        if last <= first:
            return None
        names = self.chain(key, last, namespace)
        blocks = []
        for b in range(first, last):
            rows = self._read_block(names[b], key[b * bs : (b + 1) * bs])
            if rows is None:
                break
            blocks.append(rows)
        if not blocks:
            return None
        return torch.cat(blocks, dim=2)[:, :, start - first * bs :]

    def probe(self, key: list[int], start: int, end: int, namespace: str = "") -> int:
        """How many tokens of ``key[start:end]`` ``read_run`` would return if every block is intact:
        the consecutive blocks whose files exist (a stat each, nothing read). Admission budgets with it."""
        bs = self.block_size
        first, last = start // bs, end // bs
        if last <= first:
            return 0
        found = first
        for name in self.chain(key, last, namespace)[first:]:
            if not self.path(name).exists():
                break
            found += 1
        return max(found * bs - start, 0)

    def _read_block(self, name: str, tokens: list[int]) -> torch.Tensor | None:
        path = self.path(name)
        with self._lock:
            self.reads += 1
        try:
            raw = path.read_bytes()
        except OSError:
            with self._lock:
                self.read_misses += 1
            return None
        rows = self._parse(raw, tokens)
        if rows is None:
            logger.warning("KV disk tier: block %s is torn or corrupt; treated as a miss", name[:12])
            with self._lock:
                self.corrupt += 1
                self.read_misses += 1
            path.unlink(missing_ok=True)  # it will be written again
            return None
        try:
            os.utime(path)  # LRU: a read is a use
        except OSError:
            pass
        return rows

    def _parse(self, raw: bytes, tokens: list[int]) -> torch.Tensor | None:
        """The block's rows if ``raw`` is a whole, intact block for ``tokens`` of this model; else None."""
        if len(raw) < len(MAGIC) + 4 or raw[: len(MAGIC)] != MAGIC:
            return None
        (hlen,) = struct.unpack_from("<I", raw, len(MAGIC))
        off = len(MAGIC) + 4
        if off + hlen > len(raw):
            return None
        try:
            h = _decoder.decode(raw[off : off + hlen])
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        payload = memoryview(raw)[off + hlen :]
        ok = (
            h.version == VERSION
            and h.codec == self.codec.name
            and h.pool_dtype == str(self.codec.pool_dtype)
            and h.shape == self.shape
            and h.tokens == list(tokens)
            and len(payload) == h.data_nbytes + h.scale_nbytes
            and hashlib.blake2b(payload, digest_size=16).hexdigest() == h.digest
        )
        if not ok:
            return None
        data = _tensor_from(payload[: h.data_nbytes], self.codec.storage_dtype, h.shape)
        scale = None
        if not self.codec.lossless:
            scale = _tensor_from(payload[h.data_nbytes :], torch.float32, h.shape[:-1])
        return self.codec.decode(data, scale)

    # ------------------------------------------------------------------ size bound
    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        now = time.time()
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                p = Path(dirpath) / n
                try:
                    st = p.stat()
                except OSError:
                    continue  # removed by another replica meanwhile
                if n.startswith(_TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_S:
                        p.unlink(missing_ok=True)
                    continue
                if n.endswith(_SUFFIX):
                    out.append((st.st_mtime, st.st_size, p))
        return out

    def _scan_size(self) -> int:
        self._scanned_at = time.monotonic()
        return sum(size for _, size, _ in self._files())

    def _evict(self) -> None:
        self._scanned_at = time.monotonic()
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        target = int(self.max_bytes * 0.9)
        removed = 0
        for _, size, p in files:
            if total <= target:
                break
            try:
                p.unlink()
            except FileNotFoundError:
                pass  # another replica evicted it first
            total -= size
            removed += 1
        with self._lock:
            self._bytes = total
            self.evicted += removed

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        if not self._closed and not self._thread.is_alive():
            raise AssertionError("KV disk tier: the writer thread died")
        with self._lock:
            if self._bytes < 0:
                raise AssertionError(f"KV disk tier: negative size {self._bytes}")

    def stats(self) -> dict:
        with self._lock:
            return {
                "hicache_storage_bytes": self._bytes,
                "hicache_storage_writes": self.writes,
                "hicache_storage_write_skips": self.write_skips,
                "hicache_storage_reads": self.reads,
                "hicache_storage_read_misses": self.read_misses,
                "hicache_storage_corrupt": self.corrupt,
                "hicache_storage_evicted": self.evicted,
            }


def _token_bytes(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor_from(buf: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape)
