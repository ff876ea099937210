"""A bounded check of a GGUF file before llama.cpp reads it.

llama.cpp's own reader (ggml's gguf.cpp) refuses a malformed header with an error, but its model
and vocabulary loaders stop the whole process (GGML_ASSERT / GGML_ABORT) on some well-formed files
with bad values. tests/model/test_gguf_fuzz.py found these, with llama-cpp-python 0.3.36:

- `{arch}.block_count` of 0 or more than 512 (llama-model.cpp: n_layer_all <= LLAMA_MAX_LAYERS);
- two tokens with the same text in `tokenizer.ggml.tokens` (llama-vocab.cpp: id_to_token.size()
  == token_to_id.size());
- byte tokens (token type 6) in a WordPiece ("bert") vocabulary (llama-vocab.cpp: fatal error);
- a negative or NaN `*_epsilon` (ggml-cpu ops.cpp: eps >= 0, at the first decode).

`check_gguf` walks the header with plain struct reads, every count and length bounded by the bytes
left in the file, so a corrupt file cannot make it allocate or loop beyond the file's size. It
checks the structure (magic, version, counts, keys, value types, array lengths, tensor names,
dimensions, types, data offsets and sizes within the file) and the values above, and raises a
one-line `ModelLoadError` naming the file and the problem.

It is the project's only hand-written GGUF header parser: the memory estimate, placement, the
runtime's pre-load check and the VocabTrim map (`VocabMap.from_gguf`, whose int32 arrays are in
`GGUFHeader.arrays`) all read the header through `check_gguf`. The exporters that rewrite files
use llama.cpp's own `gguf` package.

Cost: one pass over the header through mmap, no tensor data read. The vocabulary's strings are
stepped over one by one and checked for duplicates: 60-100 ms for the default Qwen2.5 models
(152k tokens and 151k merges), well under a tenth of llama.cpp's own load; 0.3 ms for the tiny
test models. Since one load asks for the same header several times (memory estimate, placement,
the runtime, the vocabulary map), the last few headers read are kept, keyed by the resolved path
and the file's identity (device, inode), size, modification and status-change times: an unchanged
file is walked once, a changed or replaced one again. A file changed in the last two seconds is
not kept (a rewrite within the same tick of the file system's clock would not show in its stat):
it is walked on every call.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edgespec.errors import ModelLoadError

__all__ = ["GGML_TYPES", "GGUFHeader", "check_gguf", "clear_header_cache"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what llama.cpp reads; version 1 had 32-bit counts and is no longer supported
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, the terminating NUL included
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS

# GGUF value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64, _I64, _F64 = range(13)
_SCALARS = {
    _U8: struct.Struct("<B"),
    _I8: struct.Struct("<b"),
    _U16: struct.Struct("<H"),
    _I16: struct.Struct("<h"),
    _U32: struct.Struct("<I"),
    _I32: struct.Struct("<i"),
    _F32: struct.Struct("<f"),
    _BOOL: struct.Struct("<?"),
    _U64: struct.Struct("<Q"),
    _I64: struct.Struct("<q"),
    _F64: struct.Struct("<d"),
}
_U32S = _SCALARS[_U32]
_U64S = _SCALARS[_U64]
_I64S = _SCALARS[_I64]
# numpy dtypes of the fixed-size value types, for arrays
_DTYPES: dict[int, np.dtype[Any]] = {
    _U8: np.dtype("u1"), _I8: np.dtype("i1"), _U16: np.dtype("<u2"), _I16: np.dtype("<i2"),
    _U32: np.dtype("<u4"), _I32: np.dtype("<i4"), _F32: np.dtype("<f4"), _BOOL: np.dtype("?"),
    _U64: np.dtype("<u8"), _I64: np.dtype("<i8"), _F64: np.dtype("<f8"),
}  # fmt: skip

# The ggml tensor types of the bundled llama.cpp (GGML_TYPE_COUNT = 43): id → (values per block,
# bytes per block). Ids 4, 5, 31-33 and 36-38 were removed from ggml. tests/model/test_gguf_fuzz.py
# checks this table against the ggml library llama-cpp-python ships.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
    28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
    40: (64, 36), 41: (128, 18), 42: (64, 18),
}  # fmt: skip

_TOKEN_TYPE_BYTE = 6  # llama_token_type LLAMA_TOKEN_TYPE_BYTE


@dataclass(frozen=True)
class GGUFHeader:
    """What the check read. Shared by every caller that reads the same file (see the module's
    docstring), so it is read-only throughout.

    Attributes:
        version: the GGUF version (2 or 3).
        n_tensors: how many tensors the file holds.
        metadata: the scalar and string entries (strings decoded as UTF-8, bad bytes replaced);
            arrays are left out.
        data_offset: where the tensor data starts.
        arrays: the arrays of fixed-size values (integers, floats, bools) as read-only numpy
            arrays of their GGUF type; arrays of strings are left out.
        n_elements: the values all its tensors hold together (the parameter count of the part of
            the model in this file).
        vocab_digest: sha256 of the `tokenizer.ggml.tokens` array as stored (every token's text,
            in order, with its length), "" without one: equal digests, equal vocabularies.
        n_tokens: how many tokens that array holds (0 without one).
    """

    version: int
    n_tensors: int
    metadata: Mapping[str, Any] = field(repr=False)
    data_offset: int
    arrays: Mapping[str, np.ndarray] = field(repr=False)
    n_elements: int = 0
    vocab_digest: str = ""
    n_tokens: int = 0


class _Bad(Exception):
    """A problem, to be raised as a ModelLoadError naming the file."""


def _shown(text: str | bytes, limit: int = 48) -> str:
    """A name or token text from the file for a message: quoted, escaped, cut to `limit`."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def check_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Check that `path` is a GGUF model file llama.cpp can read without stopping the process.

    An unchanged file checked before (one of the last few) is not read again: its header comes
    from the cache (see the module's docstring).

    Args:
        path: the model file.

    Returns:
        what the header holds.

    Raises:
        ModelLoadError: the file is missing, not GGUF, truncated, corrupt, or holds values
            llama.cpp would abort on; one line naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        where = str(path.resolve())
        cached = _cached(_cache_key(where, path.stat()))
        if cached is not None:
            return cached
        started = time.time_ns()
        with path.open("rb") as handle:
            magic = handle.read(4)
            if magic != MAGIC:
                raise ModelLoadError(
                    f"{path} is not a GGUF model file (it starts with {magic!r}, a GGUF file starts "
                    f"with {MAGIC!r})"
                )
            stat = os.fstat(handle.fileno())  # of the bytes read below
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                header = _Reader(data).header()
    except _Bad as exc:
        raise ModelLoadError(f"could not load {path}: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"could not read {path}: {exc.strerror or exc}") from None
    if max(stat.st_mtime_ns, stat.st_ctime_ns) < started - _SETTLED_NS:
        _remember(_cache_key(where, stat), header)
    return header


# -- the cache of headers read ----------------------------------------------------------------

_CACHE_SIZE = 8  # headers kept: a load reads two files (target, drafter), a bench a few drafters
# A file changed this recently (its modification or status-change time) is not cached: a second
# write in the same tick of the file system's clock (up to 2 s on FAT) could leave its size and
# times as they were. ctime also covers a writer that sets the modification time back (copy2).
_SETTLED_NS = 2_000_000_000
_cache: OrderedDict[tuple[str, int, int, int, int, int], GGUFHeader] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_key(where: str, stat: os.stat_result) -> tuple[str, int, int, int, int, int]:
    """The resolved path, and what changes when the file is rewritten or replaced."""
    return (where, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _cached(key: tuple[str, int, int, int, int, int]) -> GGUFHeader | None:
    with _cache_lock:
        header = _cache.get(key)
        if header is not None:
            _cache.move_to_end(key)
        return header


def _remember(key: tuple[str, int, int, int, int, int], header: GGUFHeader) -> None:
    with _cache_lock:
        for old in [k for k in _cache if k[0] == key[0]]:  # an earlier version of the file
            del _cache[old]
        _cache[key] = header
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def clear_header_cache() -> None:
    """Forget the headers read so far (the next `check_gguf` of each file reads it again)."""
    with _cache_lock:
        _cache.clear()


class _Reader:
    """One pass over a GGUF header held in `data`."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.types: dict[str, int] = {}  # metadata key → value type
        self.names: set[bytes] = set()  # tensor names

    # -- bounded reads ------------------------------------------------------------------------

    def _past_end(self, what: str, end: int) -> _Bad:
        return _Bad(
            f"{what} runs past the end of the file (to byte {end:,} of {self.size:,}); "
            "the file is truncated or corrupt"
        )

    def scalar(self, kind: struct.Struct, what: str) -> Any:
        end = self.pos + kind.size
        if end > self.size:
            raise self._past_end(what, end)
        (value,) = kind.unpack_from(self.data, self.pos)
        self.pos = end
        return value

    def string(self, what: str) -> tuple[int, int]:
        """(start, end) of the string at the current position."""
        n = self.scalar(_U64S, f"the length of {what}")
        start, end = self.pos, self.pos + n
        if end > self.size:
            raise self._past_end(f"{what} ({n:,} bytes)", end)
        self.pos = end
        return start, end

    def text(self, what: str) -> str:
        start, end = self.string(what)
        return self.data[start:end].decode("utf-8", "replace")

    def count(self, what: str, min_size: int) -> int:
        """A u64 count of items at least `min_size` bytes each, that the rest of the file can hold."""
        n = self.scalar(_U64S, f"the count of {what}")
        if n > (self.size - self.pos) // max(min_size, 1):
            raise _Bad(f"it claims {n:,} {what}, more than the rest of its {self.size:,} bytes can hold")
        return n

    def strings(self, n: int, what: str, collect: bool) -> list[int] | None:
        """Step over n strings; with `collect`, return their start offsets and the end."""
        unpack, data, pos = _U64S.unpack_from, self.data, self.pos
        starts: list[int] | None = None
        try:
            if collect:
                starts = [0] * (n + 1)
                for i in range(n):
                    starts[i] = pos
                    pos += 8 + unpack(data, pos)[0]
                starts[n] = pos
            else:
                for _ in range(n):
                    pos += 8 + unpack(data, pos)[0]
        except (struct.error, OverflowError):
            raise self._past_end(what, pos + 8) from None
        if pos > self.size:
            raise self._past_end(what, pos)
        self.pos = pos
        return starts

    # -- the file -----------------------------------------------------------------------------

    def header(self) -> GGUFHeader:
        self.pos = 4
        version = self.scalar(_U32S, "the GGUF version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in VERSIONS:
                raise _Bad("it is a big-endian GGUF file; llama.cpp reads little-endian ones")
            raise _Bad(f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)")
        n_tensors = self.scalar(_U64S, "the tensor count")
        # Each metadata entry takes at least 13 bytes (key length, type, a one-byte value), each
        # tensor info at least 24 (name length, dimension count, type, offset).
        n_kv = self.count("metadata entries", 13)
        if n_tensors > (self.size - self.pos) // 24:
            raise _Bad(f"it claims {n_tensors:,} tensors, more than its {self.size:,} bytes can hold")
        metadata: dict[str, Any] = {}
        arrays: dict[str, tuple[int, int, int, list[int] | None]] = {}
        for i in range(n_kv):
            self.entry(i, metadata, arrays)
        if self.types.get("general.alignment", _U32) != _U32:
            raise _Bad("general.alignment must be a uint32")
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
            raise _Bad(f"general.alignment is {alignment!r}, not a power of two")
        tensors = [self.tensor_info(i, alignment) for i in range(n_tensors)]
        data_offset = self.pos + (-self.pos % alignment)
        if n_tensors and data_offset > self.size:
            raise self._past_end("the tensor data's start", data_offset)
        data_size = self.size - data_offset
        for name, offset, nbytes, _ in tensors:
            if offset + nbytes > data_size:
                raise self._past_end(
                    f"tensor {name} ({nbytes:,} bytes at {offset:,})", data_offset + offset + nbytes
                )
        _check_values(self.data, metadata, arrays)
        values = {key: self.array(elem, n, at) for key, (elem, n, at, _) in arrays.items() if elem in _DTYPES}
        _, n_tokens, _, starts = arrays.get("tokenizer.ggml.tokens", (0, 0, 0, None))
        digest = hashlib.sha256(self.data[starts[0] : starts[-1]]).hexdigest() if starts else ""
        return GGUFHeader(
            version,
            n_tensors,
            MappingProxyType(metadata),
            data_offset,
            MappingProxyType(values),
            sum(n for *_, n in tensors),
            digest,
            n_tokens if starts else 0,
        )

    def array(self, elem: int, n: int, at: int) -> np.ndarray:
        """A read-only copy of the n values of type `elem` at `at` (bounds checked when read)."""
        values = np.frombuffer(self.data, dtype=_DTYPES[elem], count=n, offset=at).copy()
        values.flags.writeable = False
        return values

    def entry(
        self, i: int, metadata: dict[str, Any], arrays: dict[str, tuple[int, int, int, list[int] | None]]
    ) -> None:
        """Read metadata entry i into `metadata` (scalars, strings) or `arrays` (element type,
        count, offset of the first element, the string starts of tokenizer.ggml.tokens)."""
        key = self.text(f"metadata entry {i}'s key")
        where = f"metadata entry {i} ({_shown(key)})"
        if key in self.types:
            raise _Bad(f"{where} repeats an earlier key")
        kind = self.scalar(_U32S, f"the type of {where}")
        self.types[key] = kind
        if kind == _STRING:
            metadata[key] = self.text(where)
        elif kind == _ARRAY:
            elem = self.scalar(_U32S, f"the element type of {where}")
            if elem == _STRING:
                n = self.count(f"strings in {where}", 8)
                at = self.pos
                starts = self.strings(n, where, collect=key == "tokenizer.ggml.tokens")
                arrays[key] = (elem, n, at, starts)
            elif elem in _SCALARS:
                n = self.count(f"values in {where}", _SCALARS[elem].size)
                arrays[key] = (elem, n, self.pos, None)
                self.pos += n * _SCALARS[elem].size
            else:
                raise _Bad(f"{where} is an array of unknown type {elem} (nested arrays are not allowed)")
        elif kind in _SCALARS:
            metadata[key] = self.scalar(_SCALARS[kind], where)
        else:
            raise _Bad(f"{where} has unknown value type {kind}")

    def tensor_info(self, i: int, alignment: int) -> tuple[str, int, int, int]:
        """Read tensor info i: (name, data offset, size in bytes, values)."""
        start, end = self.string(f"tensor {i}'s name")
        raw = self.data[start:end]
        name = _shown(raw.decode("utf-8", "replace"))
        if end - start >= MAX_NAME:
            raise _Bad(f"tensor {i}'s name is {end - start:,} bytes long (llama.cpp allows {MAX_NAME - 1})")
        if raw in self.names:
            raise _Bad(f"tensor {name} appears twice")
        self.names.add(raw)
        n_dims = self.scalar(_U32S, f"the dimension count of tensor {name}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims:,} dimensions (at most {MAX_DIMS})")
        dims = [self.scalar(_I64S, f"the shape of tensor {name}") for _ in range(n_dims)]
        kind = self.scalar(_U32S, f"the type of tensor {name}")
        offset = self.scalar(_U64S, f"the data offset of tensor {name}")
        if any(d < 0 for d in dims):
            raise _Bad(f"tensor {name} has a negative dimension {dims}")
        n = math.prod(dims)
        if n >= 2**63:
            raise _Bad(f"tensor {name} has too many elements {dims}")
        if kind not in GGML_TYPES:
            raise _Bad(f"tensor {name} has unknown ggml type {kind}")
        block, block_bytes = GGML_TYPES[kind]
        if dims and dims[0] % block:
            raise _Bad(
                f"tensor {name}: its first dimension {dims[0]} is not a multiple of its type's block {block}"
            )
        if offset % alignment:
            raise _Bad(
                f"tensor {name} has data offset {offset:,}, not a multiple of the alignment {alignment}"
            )
        return name, offset, n // block * block_bytes, n


def _check_values(
    data: mmap.mmap, metadata: dict[str, Any], arrays: dict[str, tuple[int, int, int, list[int] | None]]
) -> None:
    """The values llama.cpp aborts on (see the module's docstring)."""
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count")
    if isinstance(layers, int) and not isinstance(layers, bool) and not 1 <= layers <= MAX_LAYERS:
        key = _shown(f"{arch}.block_count")
        raise _Bad(f"{key} is {layers:,}; llama.cpp supports 1 to {MAX_LAYERS} layers")
    for key, value in metadata.items():
        if key.endswith("epsilon") and isinstance(value, float) and not (value >= 0 and math.isfinite(value)):
            raise _Bad(f"{_shown(key)} is {value}; it must be a finite number of at least 0")
    _, n, _, starts = arrays.get("tokenizer.ggml.tokens", (0, 0, 0, None))
    if starts is not None:  # an array of strings (llama.cpp refuses any other type)
        texts = [data[a + 8 : b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        if len(set(texts)) != n:
            first: dict[bytes, int] = {}
            for i, text in enumerate(texts):
                if text in first:
                    raise _Bad(
                        f"tokens {first[text]} and {i} of tokenizer.ggml.tokens are both {_shown(text)}"
                    )
                first[text] = i
    types = arrays.get("tokenizer.ggml.token_type")
    if metadata.get("tokenizer.ggml.model") == "bert" and types is not None and types[0] == _I32:
        _, n_types, at, _ = types
        values = struct.unpack_from(f"<{n_types}i", data, at)
        if _TOKEN_TYPE_BYTE in values:
            token = values.index(_TOKEN_TYPE_BYTE)
            raise _Bad(
                f"token {token} is a byte token (type 6), which a WordPiece ('bert') vocabulary cannot have"
            )
