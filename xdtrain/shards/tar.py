"""Writing one WebDataset shard: a GNU tar file plus the DALI index that describes it.

A sample is a key without dots and its components (``key.jpg``, ``key.cls``, ...), written as
consecutive tar members. Members are GNU-format, 512-byte aligned, with fixed owner, mode and
time, so the same samples always give the same bytes. The shard is written under a hidden
temporary name and renamed only once complete, together with its index, so a reader never
sees half a shard.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.fileio import atomic_write

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default record: archives end on a multiple of it
INDEX_VERSION = "v1.2"  # the format wds2idx writes and fn.readers.webdataset reads
CHUNK = 4 << 20  # bytes gathered before a write: few, large system calls
_ZEROS = bytes(BLOCK)


@dataclass
class ShardInfo:
    """What the manifest records of a finished shard."""

    name: str
    samples: int
    bytes: int
    sha256: str


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


# The header of every member differs only in name, size and checksum: fill a template.
_TEMPLATE = _tarfile_header("", 0)
_CHKSUM = slice(148, 156)
_SIZE = slice(124, 136)
_BASE_SUM = sum(_TEMPLATE[:148]) + 8 * 32 + sum(_TEMPLATE[156:])


def member_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header of a regular file, with reproducible metadata.

    Byte for byte what ``tarfile`` writes for the same member (a test checks it), but built
    from a template: ``TarInfo.tobuf`` costs more than copying a 100 kB JPEG.
    """
    raw = name.encode("utf-8")
    if len(raw) >= 100 or size >= 8**11:  # long names and huge files: tarfile's extensions
        return _tarfile_header(name, size)
    header = bytearray(_TEMPLATE)
    header[: len(raw)] = raw
    header[_SIZE] = b"%011o\0" % size
    checksum = _BASE_SUM + sum(raw) + sum(header[_SIZE]) - sum(_TEMPLATE[_SIZE])
    header[_CHKSUM] = b"%06o\0 " % checksum
    return bytes(header)


def check_key(key: str) -> None:
    if not key or "." in key or "/" in key or " " in key:
        raise ValueError(f"sample key {key!r} must be non-empty, without dots, slashes or spaces")


class ShardWriter:
    """Write samples into ``path`` (a ``.tar``) and its DALI index ``path`` with ``.idx``."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync  # close() makes the shard durable before renaming it
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._hashing = None
        self._parts: list[bytes] = []
        self._buffered = 0
        self._offset = 0
        self._samples: list[list[tuple[str, int, int, str]]] = []  # (ext, offset, size, name)
        self.closed = False

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._offset

    @property
    def count(self) -> int:
        return len(self._samples)

    def _flush(self) -> None:
        # Hash on a helper thread while this one goes on (hashlib releases the GIL); one
        # chunk in flight keeps memory bounded and the order intact.
        chunk = b"".join(self._parts)
        self._parts, self._buffered = [], 0
        if self._hashing is not None:
            self._hashing.result()
        self._hashing = self._hasher.submit(self._hash.update, chunk)
        self._fh.write(chunk)

    def add(self, key: str, components: dict[str, bytes]) -> None:
        """Append one sample; ``components`` maps extensions (``jpg``, ``mask.png``) to bytes."""
        check_key(key)
        if not components:
            raise ValueError(f"sample {key!r} has no components")
        members, parts, offset = [], self._parts, self._offset
        for ext, data in components.items():
            name = f"{key}.{ext}"
            size = len(data)
            pad = -size % BLOCK
            members.append((ext, offset + BLOCK, size, name))
            parts += (member_header(name, size), data, _ZEROS[:pad])
            offset += BLOCK + size + pad
        self._buffered += offset - self._offset
        self._offset = offset
        self._samples.append(members)
        if self._buffered >= CHUNK:
            self._flush()

    def index_text(self) -> str:
        """The DALI index: ``v1.2 N``, then per sample ``ext offset size name`` per component."""
        lines = [f"{INDEX_VERSION} {len(self._samples)}"]
        for members in self._samples:
            lines.append(
                " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)
            )
        return "\n".join(lines) + "\n"

    def close(self) -> ShardInfo:
        """Finish the archive, write the index, fsync (if asked) and rename both into place."""
        end = 2 * BLOCK
        end += -(self._offset + end) % RECORD
        self._parts.append(bytes(end))
        self._offset += end
        self._flush()
        self._hashing.result()
        self._hasher.shutdown()
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        atomic_write(index_path(self.path), self.index_text(), fsync=self.fsync)
        os.replace(self.tmp, self.path)
        self.closed = True
        return ShardInfo(self.path.name, len(self._samples), self._offset, self._hash.hexdigest())

    def abort(self) -> None:
        """Drop the temporary file (on errors)."""
        if not self.closed:
            self._hasher.shutdown(cancel_futures=True)
            self._fh.close()
            self.tmp.unlink(missing_ok=True)
            self.closed = True


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_path(shard: str | os.PathLike) -> Path:
    """``train-000000.tar`` -> ``train-000000.idx``."""
    shard = Path(shard)
    return shard.with_suffix(".idx")


def read_samples(path: str | os.PathLike) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a shard, in order, grouped by key (for verification and tests)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if samples and samples[-1][0] == key:
                samples[-1][1][ext] = data
            else:
                samples.append((key, {ext: data}))
    return samples


@dataclass
class SampleRef:
    """Where a sample's components lie in a tar file, for reading them back by offset."""

    key: str
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (ext, offset, size)

    def read(self, fh) -> dict[str, bytes]:
        out = {}
        for ext, offset, size in self.parts:
            fh.seek(offset)
            out[ext] = fh.read(size)
        return out


def parse_index(text: str) -> list[SampleRef]:
    """Read a DALI ``v1.2`` index back into sample references."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(INDEX_VERSION + " "):
        raise ValueError("not a v1.2 DALI index")
    refs = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"malformed index line: {line[:80]!r}")
        name = fields[3]
        ref = SampleRef(name.partition(".")[0])
        for i in range(0, len(fields), 4):
            ref.parts.append((fields[i], int(fields[i + 1]), int(fields[i + 2])))
        refs.append(ref)
    if len(refs) != int(lines[0].split()[1]):
        raise ValueError("index sample count does not match its lines")
    return refs
