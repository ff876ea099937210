"""Fuzzing the model-loading path with mutated GGUF files.

Each case is a copy of the tiny target model with its header, metadata or tensor infos broken in
one way (or a few random bytes changed, or the file cut short). Every load runs in a worker
process, so a crash (segfault, abort), a hang or a runaway allocation inside llama.cpp shows up as
a failed case instead of taking the test run down; the worker is replaced after one. The expected
outcome of every case is a one-line `EdgespecError` (normally `ModelLoadError`), or, for a
mutation that happens to be harmless (a changed byte inside a token's text, an odd token score),
a model that loads and decodes.

Before `edgespec.formats.gguf` existed, llama.cpp aborted the process on four kinds of file found
here (see that module's docstring); `test_values_llama_cpp_aborts_on_are_refused` pins them.

The mutations are drawn from fixed seeds: the same cases run every time.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import selectors
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgespec.errors import ModelLoadError
from edgespec.formats.gguf import GGML_TYPES, check_gguf

from ..conftest import real_pair_paths

# pipes in selectors, RLIMIT_AS and /proc are POSIX things
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fuzz workers need POSIX pipes")

SEED = 20240808
CASE_TIMEOUT_S = 30.0
# Far above what loading the 0.5 MB model takes (about 50 MB); an allocation past it is a bug.
MAX_PEAK_MB = 1024
# An address-space cap for the workers, so a runaway allocation fails instead of eating the
# machine (dropped if the backend cannot start under it, as a GPU backend may not).
ADDRESS_SPACE_LIMIT = 8 << 30

_WORKER = textwrap.dedent(
    """
    import json, os, resource, sys
    # Answers go to a private copy of stdout: llama.cpp may print to fd 1 on its own.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    limit = int(sys.argv[1])
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from edgespec.errors import EdgespecError
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime, backend

    def peak_mb():
        # VmHWM is this process's own peak; ru_maxrss also counts what the parent held when it
        # forked (Linux keeps the larger of the two across exec).
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) // 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    backend()
    settings = RuntimeSettings(n_ctx=64, n_threads=1)
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        path = line.rstrip("\\n")
        try:
            with LlamaCppRuntime(path, settings) as rt:
                rt.eval([t % rt.vocab.n_vocab for t in (1, 5, 6)], logits="all")  # a first decode
            out = {"outcome": "loaded"}
        except EdgespecError as exc:
            out = {"outcome": "error", "kind": type(exc).__name__, "message": str(exc)}
        except BaseException as exc:
            out = {"outcome": "unexpected", "kind": type(exc).__name__, "message": repr(exc)[:500]}
        out["peak_mb"] = peak_mb()
        print(json.dumps(out), file=answers, flush=True)
    """
)


# ------------------------------------------------------------------------------------ the file


@dataclass(frozen=True)
class Field:
    """Where one metadata entry of the original file sits."""

    name: str
    offset: int  # of the key's length
    key_len: int
    type_at: int  # offset of the value's type tag
    value_type: int
    value_at: int  # offset of the value (of the element type, for an array)
    end: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    offset: int  # of the name's length
    n_dims_at: int
    n_dims: int
    type_at: int
    offset_at: int  # of the data offset
    data_offset: int


@dataclass(frozen=True)
class Layout:
    data: bytes
    fields: list[Field]
    tensors: list[TensorInfo]
    header_end: int  # end of the tensor infos


ALIGNMENT = 32  # the tiny models have no general.alignment
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def layout(data: bytes) -> Layout:
    """Parse a well-formed GGUF file (the original, before mutation) into field positions.

    Kept independent of the product's validator (edgespec.formats.gguf) on purpose."""
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    at = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8 : pos + 8 + n].decode(), pos + 8 + n

    fields = []
    for _ in range(n_kv):
        start = at
        name, at = string(at)
        type_at = at
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4
        value_at = at
        if kind == 8:
            _, at = string(at)
        elif kind == 9:
            elem, count = struct.unpack_from("<IQ", data, at)
            at += 12
            for _ in range(count):
                if elem == 8:
                    _, at = string(at)
                else:
                    at += _SCALAR_SIZE[elem]
        else:
            at += _SCALAR_SIZE[kind]
        fields.append(Field(name, start, len(name), type_at, kind, value_at, at))
    tensors = []
    for _ in range(n_tensors):
        start = at
        name, at = string(at)
        n_dims_at = at
        (n_dims,) = struct.unpack_from("<I", data, at)
        at += 4 + 8 * n_dims
        type_at = at
        at += 4
        (offset,) = struct.unpack_from("<Q", data, at)
        tensors.append(TensorInfo(name, start, n_dims_at, n_dims, type_at, at, offset))
        at += 8
    return Layout(data, fields, tensors, at)


# ------------------------------------------------------------------------------- the mutations


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    data: bytes


def put(data: bytes, at: int, fmt: str, value: int | float) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


U64_EXTREMES = (2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
U32_EXTREMES = (2**31 - 1, 2**31, 2**32 - 1)


def header_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """Magic, version, tensor count and metadata count."""
    data = lay.data
    for magic in (b"GGUG", b"FUGG", b"\0\0\0\0", b"GGML", b"ggjt"):
        yield Case("header", f"magic {magic!r}", magic + data[4:])
    for version in (0, 1, 4, 100, 0x03000000, 2**32 - 1):
        yield Case("header", f"version {version}", put(data, 4, "<I", version))
    n_tensors, n_kv = len(lay.tensors), len(lay.fields)
    for count in (0, 1, n_tensors - 1, n_tensors + 1, n_tensors * 2, *U64_EXTREMES):
        yield Case("header", f"tensor count {count}", put(data, 8, "<Q", count))
    for count in (0, 1, n_kv - 1, n_kv + 1, n_kv * 2, *U64_EXTREMES):
        yield Case("header", f"kv count {count}", put(data, 16, "<Q", count))


def metadata_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """Key lengths, value type tags, string lengths, array element types and lengths."""
    data = lay.data
    for f in lay.fields:
        for n in rng.sample((0, f.key_len - 1, f.key_len + 1, len(data), *U64_EXTREMES), 3):
            yield Case("metadata", f"{f.name}: key length {n}", put(data, f.offset, "<Q", n))
        for tag in rng.sample((13, 99, 2**32 - 1, 8, 9, rng.randrange(13)), 2):
            if tag != f.value_type:
                yield Case("metadata", f"{f.name}: type tag {tag}", put(data, f.type_at, "<I", tag))
        if f.value_type == 8:
            (n,) = struct.unpack_from("<Q", data, f.value_at)
            for bad in rng.sample((0, n + 1, len(data), *U64_EXTREMES), 3):
                yield Case("metadata", f"{f.name}: string length {bad}", put(data, f.value_at, "<Q", bad))
        if f.value_type == 9:
            elem, count = struct.unpack_from("<IQ", data, f.value_at)
            for tag in (9, 13, 2**32 - 1, 8 if elem != 8 else 4):
                yield Case("metadata", f"{f.name}: element type {tag}", put(data, f.value_at, "<I", tag))
            for bad in (0, count - 1, count + 1, *rng.sample(U64_EXTREMES, 4)):
                yield Case("metadata", f"{f.name}: array length {bad}", put(data, f.value_at + 4, "<Q", bad))
            if elem == 8:
                first = f.value_at + 12
                for bad in rng.sample((len(data), *U64_EXTREMES), 3):
                    yield Case(
                        "metadata", f"{f.name}: first element's length {bad}", put(data, first, "<Q", bad)
                    )


def alignment_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """general.alignment, made by renaming a uint32 entry whose key has the same length."""
    renamed = next(f for f in lay.fields if f.key_len == len("general.alignment") and f.value_type == 4)
    key_at = renamed.offset + 8
    data = lay.data[:key_at] + b"general.alignment" + lay.data[key_at + renamed.key_len :]
    for value in (0, 1, 3, 48, 64, 2**31, 2**32 - 1):
        yield Case("alignment", f"general.alignment = {value}", put(data, renamed.value_at, "<I", value))
    as_string = put(data, renamed.type_at, "<I", 5)  # int32 instead of uint32
    yield Case("alignment", "general.alignment as int32", as_string)


def hparam_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """Out-of-range model hyperparameters (and tokenizer ids) with a well-formed structure."""
    data = lay.data
    for f in lay.fields:
        if f.value_type == 4:
            for value in (0, 1, 7, 100_000, *U32_EXTREMES):
                yield Case("hparams", f"{f.name} = {value}", put(data, f.value_at, "<I", value))
        elif f.value_type == 6:
            for value in (0.0, -1.0, float("nan"), float("inf"), 1e38):
                yield Case("hparams", f"{f.name} = {value}", put(data, f.value_at, "<f", value))
        elif f.value_type == 8 and not f.name.startswith("tokenizer.chat"):
            (n,) = struct.unpack_from("<Q", data, f.value_at)
            text = data[f.value_at + 8 : f.value_at + 8 + n]
            for other in (b"x" * n, bytes(n), b"\xff" * n):
                if other != text:
                    yield Case(
                        "hparams",
                        f"{f.name} = {other[:8]!r}",
                        data[: f.value_at + 8] + other + data[f.value_at + 8 + n :],
                    )


def string_at(data: bytes, at: int) -> tuple[bytes, int]:
    """The GGUF string at `at` and the offset after it."""
    (n,) = struct.unpack_from("<Q", data, at)
    return data[at + 8 : at + 8 + n], at + 8 + n


def splice(lay: Layout, start: int, end: int, new: bytes) -> bytes:
    """The file with header bytes start … end replaced by `new`, the tensor data moved to stay
    aligned (its offsets are relative to where it starts)."""
    data = lay.data
    header = data[:start] + new + data[end : lay.header_end]
    return header + bytes(-len(header) % ALIGNMENT) + data[lay.header_end + (-lay.header_end % ALIGNMENT) :]


def replace_string(lay: Layout, at: int, text: bytes) -> bytes:
    """The file with the metadata string at `at` replaced."""
    _, end = string_at(lay.data, at)
    return splice(lay, at, end, struct.pack("<Q", len(text)) + text)


def value_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """Well-formed files whose entries hold a value of the wrong type or length."""
    by_name = {f.name: f for f in lay.fields}
    text = struct.pack("<Q", 1) + b"3"
    values = {
        "uint64": struct.pack("<IQ", 10, 3),
        "int32": struct.pack("<Ii", 5, 3),
        "float32": struct.pack("<If", 6, 3.0),
        "bool": struct.pack("<IB", 7, 1),
        "string": struct.pack("<I", 8) + text,
        "array of uint32": struct.pack("<IIQI", 9, 4, 1, 3),
        "empty array": struct.pack("<IIQ", 9, 4, 0),
        "array of strings": struct.pack("<IIQ", 9, 8, 1) + text,
    }
    for key in (
        "general.architecture",
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
    ):
        f = by_name[key]
        for what, value in values.items():
            yield Case("value types", f"{key} as {what}", splice(lay, f.type_at, f.end, value))
    # arrays of the right type but the wrong length
    count = struct.unpack_from("<Q", lay.data, by_name["tokenizer.ggml.tokens"].value_at + 4)[0]
    for key, elem, size in (("tokenizer.ggml.scores", 6, 4), ("tokenizer.ggml.token_type", 5, 4)):
        f = by_name[key]
        for n in (0, 1, count - 1):
            head = struct.pack("<IIQ", 9, elem, n)
            start = f.value_at + 12
            yield Case(
                "value types",
                f"{key} has {n} of {count} values",
                splice(lay, f.type_at, f.end, head + lay.data[start : start + size * n]),
            )
    tokens = by_name["tokenizer.ggml.tokens"]
    first = at = tokens.value_at + 12
    for n in range(count):
        if n in (0, 1, 10, count - 1):
            yield Case(
                "value types",
                f"tokenizer.ggml.tokens has {n} of {count} tokens",
                splice(lay, tokens.type_at, tokens.end, struct.pack("<IIQ", 9, 8, n) + lay.data[first:at]),
            )
        _, at = string_at(lay.data, at)


def tokenizer_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """A well-formed structure with a broken vocabulary: duplicate or empty tokens, odd token
    types and scores."""
    data = lay.data
    by_name = {f.name: f for f in lay.fields}
    tokens = by_name["tokenizer.ggml.tokens"]
    count = struct.unpack_from("<Q", data, tokens.value_at + 4)[0]
    starts, at = [], tokens.value_at + 12
    for _ in range(count):
        starts.append(at)
        _, at = string_at(data, at)
    for i, j in [(0, 1), (5, 6), (count - 1, count - 2), *[rng.sample(range(count), 2) for _ in range(4)]]:
        text, _ = string_at(data, starts[j])
        yield Case("tokenizer", f"token {i} duplicates token {j}", replace_string(lay, starts[i], text))
    for i in (0, 3, 100, count - 1):
        yield Case("tokenizer", f"token {i} is empty", replace_string(lay, starts[i], b""))
        yield Case("tokenizer", f"token {i} is not UTF-8", replace_string(lay, starts[i], b"\xff\xfe"))
    types = by_name["tokenizer.ggml.token_type"]
    for i in (0, 1, 3, 100, count - 1):
        for value in (0, 6, 7, 100, 2**31 - 1, 2**32 - 1):
            at = types.value_at + 12 + 4 * i
            yield Case("tokenizer", f"token {i} has type {value}", put(data, at, "<I", value))
    scores = by_name["tokenizer.ggml.scores"]
    for i in (0, 100, count - 1):
        for value in (float("nan"), float("inf"), -float("inf")):
            at = scores.value_at + 12 + 4 * i
            yield Case("tokenizer", f"token {i} has score {value}", put(data, at, "<f", value))
    model = by_name["tokenizer.ggml.model"]
    for name in (b"", b"gpt2", b"bert", b"t5", b"rwkv", b"nonsense", b"none"):
        yield Case("tokenizer", f"tokenizer model {name!r}", replace_string(lay, model.value_at, name))


def tensor_info_cases(lay: Layout, rng: random.Random) -> Iterator[Case]:
    """Name lengths, dimension counts, dimensions, ggml types and data offsets of 8 tensors."""
    data = lay.data
    for t in rng.sample(lay.tensors, 8):
        for bad in (0, 64, 200, *rng.sample(U64_EXTREMES, 2)):
            yield Case("tensor info", f"{t.name}: name length {bad}", put(data, t.offset, "<Q", bad))
        for bad in (0, 3 if t.n_dims != 3 else 2, 5, 8, *U32_EXTREMES):
            yield Case("tensor info", f"{t.name}: n_dims {bad}", put(data, t.n_dims_at, "<I", bad))
        dim_at = t.n_dims_at + 4 + 8 * rng.randrange(t.n_dims)
        (dim,) = struct.unpack_from("<Q", data, dim_at)
        for bad in (0, 1, dim + 1, dim * 2, 2**31, 2**40, 2**62, 2**63 - 1, 2**64 - 1):
            yield Case("tensor info", f"{t.name}: dim {bad}", put(data, dim_at, "<Q", bad))
        (kind,) = struct.unpack_from("<I", data, t.type_at)
        for bad in (4, 31, 36, 43, 1000, 2**32 - 1, 1 if kind != 1 else 0, 12):
            yield Case("tensor info", f"{t.name}: type {bad}", put(data, t.type_at, "<I", bad))
        for bad in (t.data_offset + 1, t.data_offset + 32, len(data), 2**40, 2**63, 2**64 - 1):
            yield Case("tensor info", f"{t.name}: data offset {bad}", put(data, t.offset_at, "<Q", bad))


def byte_flip_cases(lay: Layout, rng: random.Random, n: int = 100) -> Iterator[Case]:
    """1-8 random bytes changed anywhere in the header or the first KB of tensor data."""
    span = min(len(lay.data), lay.header_end + 1024)
    for i in range(n):
        out = bytearray(lay.data)
        flips = rng.randint(1, 8)
        where = sorted(rng.randrange(4, span) for _ in range(flips))
        for at in where:
            out[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        yield Case("byte flips", f"#{i} at {where}", bytes(out))


def truncation_cases(lay: Layout, rng: random.Random, n: int = 60) -> Iterator[Case]:
    """The file cut at n points: inside every part of the header, and in the tensor data."""
    cuts = {0, 1, 3, 4, 7, 8, 15, 16, 23, 24, lay.header_end - 1, lay.header_end, len(lay.data) - 1}
    cuts |= {f.offset + 4 for f in rng.sample(lay.fields, 4)}
    cuts |= {t.offset_at + 4 for t in rng.sample(lay.tensors, 4)}
    while len(cuts) < n:
        end = lay.header_end if len(cuts) % 3 else len(lay.data)
        cuts.add(rng.randrange(1, end))
    for cut in sorted(cuts):
        yield Case("truncation", f"at byte {cut} of {len(lay.data)}", lay.data[:cut])


# ------------------------------------------------------------------------------ the workers


class WorkerStartError(RuntimeError):
    """The worker process did not come up (its stderr is the message)."""


class Worker:
    """A process that loads the GGUF files it is sent, one at a time, and reports each outcome."""

    def __init__(self, limit: int) -> None:
        # not a pipe: a chatty worker must never block on it; closed by close()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.closed = False
        # GGML_NO_BACKTRACE: on an abort, ggml would otherwise attach gdb to print a backtrace.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), GGML_NO_BACKTRACE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        ready = self._read_line(120.0)
        if not ready or json.loads(ready) != {"ready": True}:
            raise WorkerStartError(self._stop())

    def _read_line(self, timeout: float) -> str | None:
        """The next answer; "" when the worker died, None when it gave none in time."""
        assert self.proc.stdout is not None
        if not self.selector.select(timeout):
            return None
        return self.proc.stdout.readline()

    def _stop(self) -> str:
        """Stop the worker; the end of what it wrote to stderr."""
        self._kill()
        self.log.seek(0)
        text = self.log.read()[-2000:].decode("utf-8", "replace")
        self.close()
        return text

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def load(self, path: Path) -> dict:
        """The outcome of loading `path`: "loaded", "error", "unexpected", or, when the worker
        died or stopped answering, "crash" / "hang" (the worker is then stopped)."""
        assert self.proc.stdin is not None
        start = time.perf_counter()
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._read_line(CASE_TIMEOUT_S)
        if not line:
            stderr = self._stop().strip().splitlines()[-3:]
            return {
                "outcome": "hang" if line is None else "crash",
                "code": self.proc.returncode,
                "stderr": stderr,
            }
        out = json.loads(line)
        out["seconds"] = round(time.perf_counter() - start, 3)
        return out

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.selector.close()
        self.log.close()


class Loader:
    """Runs cases through a worker, replacing it after a crash or a hang."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.limit = ADDRESS_SPACE_LIMIT
        self.worker: Worker | None = None
        self.n = 0

    def _worker(self) -> Worker:
        if self.worker is None or self.worker.closed or not self.worker.alive:
            try:
                self.worker = Worker(self.limit)
            except WorkerStartError:
                if not self.limit:
                    raise
                self.limit = 0  # the backend needs more address space than the cap allows
                self.worker = Worker(self.limit)
        return self.worker

    def run(self, cases: Iterable[Case]) -> list[tuple[Case, dict]]:
        """Every case's outcome (the cases' bytes are dropped as they are done)."""
        results = []
        for case in cases:
            self.n += 1
            path = self.directory / f"case{self.n:04d}.gguf"
            path.write_bytes(case.data)
            out = self._worker().load(path)
            path.unlink()
            results.append((Case(case.family, case.name, b""), out))
        return results

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def bad_outcome(out: dict) -> str | None:
    """Why an outcome is not acceptable, or None."""
    if out["outcome"] not in ("loaded", "error"):
        return f"{out['outcome']}: {out}"
    if out["peak_mb"] > MAX_PEAK_MB:
        return f"the worker's memory peaked at {out['peak_mb']} MB"
    if out["outcome"] == "error" and ("\n" in out["message"] or not out["message"].strip()):
        return f"not a one-line message: {out['message']!r}"
    return None


# ------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def original(tiny_pair: tuple[Path, Path]) -> Layout:
    return layout(tiny_pair[0].read_bytes())


@pytest.fixture(scope="module")
def loader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loader]:
    loader = Loader(tmp_path_factory.mktemp("fuzz"))
    yield loader
    loader.close()


Family = Callable[[Layout, random.Random], Iterator[Case]]


def fuzz(loader: Loader, lay: Layout, family: Family, *, must_fail: bool) -> list[tuple[Case, dict]]:
    """Run one family of mutations; fail on any crash, hang, huge allocation, other exception or
    multi-line message (and, with `must_fail`, on a mutated file that loads)."""
    rng = random.Random(f"{SEED}-{family.__name__}")
    results = loader.run(family(lay, rng))
    assert results
    problems = [f"{case.name}: {why}" for case, out in results if (why := bad_outcome(out))]
    if must_fail:
        problems += [f"{case.name}: loaded" for case, out in results if out["outcome"] == "loaded"]
    assert not problems, f"{len(problems)} of {len(results)} cases:\n" + "\n".join(problems[:20])
    return results


def test_header_mutations_fail_cleanly(loader, original):
    fuzz(loader, original, header_cases, must_fail=True)


def test_metadata_structure_mutations_fail_cleanly(loader, original):
    fuzz(loader, original, metadata_cases, must_fail=True)


def test_alignment_mutations_fail_cleanly(loader, original):
    fuzz(loader, original, alignment_cases, must_fail=True)


def test_tensor_info_mutations_fail_cleanly(loader, original):
    fuzz(loader, original, tensor_info_cases, must_fail=True)


def test_truncations_fail_cleanly(loader, original):
    fuzz(loader, original, truncation_cases, must_fail=True)


def test_hyperparameter_mutations_never_crash(loader, original):
    results = fuzz(loader, original, hparam_cases, must_fail=False)
    outcomes = {case.name: out for case, out in results}
    for bad in ("0", "100000", "4294967295"):
        assert "block_count" in outcomes[f"llama.block_count = {bad}"]["message"]
    assert "epsilon" in outcomes["llama.attention.layer_norm_rms_epsilon = nan"]["message"]
    # llama.cpp's own reason, read from its error log
    assert "unknown model architecture: 'xxxxx'" in outcomes["general.architecture = b'xxxxx'"]["message"]


def test_value_type_mutations_never_crash(loader, original):
    fuzz(loader, original, value_cases, must_fail=False)


def test_tokenizer_mutations_never_crash(loader, original):
    results = fuzz(loader, original, tokenizer_cases, must_fail=False)
    outcomes = {case.name: out for case, out in results}
    assert "tokens 5 and 6" in outcomes["token 5 duplicates token 6"]["message"]
    assert "byte token" in outcomes["tokenizer model b'bert'"]["message"]
    assert "unknown tokenizer: 'nonsense'" in outcomes["tokenizer model b'nonsense'"]["message"]


def test_random_byte_flips_never_crash(loader, original):
    fuzz(loader, original, byte_flip_cases, must_fail=False)


def _case(family: Family, lay: Layout, name: str) -> Case:
    return next(c for c in family(lay, random.Random(f"{SEED}-{family.__name__}")) if c.name == name)


ABORTS = [
    (hparam_cases, "llama.block_count = 0", r"'llama.block_count' is 0; llama.cpp supports 1 to 512"),
    (hparam_cases, "llama.block_count = 100000", r"is 100,000; llama.cpp supports 1 to 512 layers"),
    (tokenizer_cases, "token 5 duplicates token 6", r"tokens 5 and 6 of tokenizer.ggml.tokens are both"),
    (tokenizer_cases, "tokenizer model b'bert'", r"a WordPiece \('bert'\) vocabulary cannot have"),
    (hparam_cases, "llama.attention.layer_norm_rms_epsilon = -1.0", r"epsilon' is -1.0; it must be"),
    (hparam_cases, "llama.attention.layer_norm_rms_epsilon = nan", r"epsilon' is nan; it must be"),
]


ABORT_IDS = [
    "block_count-0",
    "block_count-100000",
    "duplicate-token",
    "bert-byte-token",
    "eps-negative",
    "eps-nan",
]


@pytest.mark.parametrize(("family", "name", "message"), ABORTS, ids=ABORT_IDS)
def test_values_llama_cpp_aborts_on_are_refused(original, tmp_path, family, name, message):
    """Files on which llama.cpp stopped the process (GGML_ASSERT / GGML_ABORT) before the check."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(_case(family, original, name).data)
    with pytest.raises(ModelLoadError, match=message) as info:
        check_gguf(path)
    assert str(info.value).startswith(f"could not load {path}: ") and "\n" not in str(info.value)


def test_cli_reports_a_corrupt_model_in_one_line(original, tiny_pair, tmp_path):
    """`edgespec run` as a real process: exit status 1 and one line on stderr, for a bad target
    and for a bad draft next to a good target."""
    files = {
        "block_count": _case(hparam_cases, original, "llama.block_count = 0"),
        "duplicate token": _case(tokenizer_cases, original, "token 5 duplicates token 6"),
        "truncated": Case("", "", original.data[: original.header_end // 2]),
        "kv count": _case(header_cases, original, f"kv count {2**63}"),
    }
    runs = []
    for i, (label, case) in enumerate(files.items()):
        path = tmp_path / f"bad{i}.gguf"
        path.write_bytes(case.data)
        target, draft = (path, "none") if i % 2 == 0 else (tiny_pair[0], str(path))
        args = ["run", "--target", str(target), "--draft", draft, "--ctx", "64", "--threads", "1", "hi"]
        env = dict(os.environ, EDGESPEC_CACHE_DIR=str(tmp_path / "cache"), GGML_NO_BACKTRACE="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgespec", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        runs.append((label, path, proc))
    for label, path, proc in runs:
        stdout, stderr = proc.communicate(timeout=120)
        lines = stderr.decode().strip().splitlines()
        assert proc.returncode == 1, (label, proc.returncode, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"error: could not load {path}: "), (label, lines)
        assert not stdout


def test_check_accepts_the_tiny_models(tiny_pair, tiny_changed_vocab):
    for path in (*tiny_pair, tiny_changed_vocab):
        header = check_gguf(path)
        assert header.version == 3 and header.n_tensors > 0
        assert header.metadata["general.architecture"] == "llama"
        assert header.data_offset % 32 == 0


@pytest.mark.real
def test_check_reads_the_default_pair():
    """The validator accepts the default models (its cost, about 60 ms a model, is measured in
    BENCHMARKS.md, not bounded here)."""
    for path in real_pair_paths():
        header = check_gguf(path)
        assert header.metadata["general.architecture"] == "qwen2"
        assert header.metadata["qwen2.block_count"] in (24, 28)


def test_ggml_type_table_matches_the_bundled_ggml():
    """GGML_TYPES (block size, bytes per block) against the ggml library llama-cpp-python ships."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("*ggml-base*")) + sorted(lib_dir.glob("*ggml*"))
    if not candidates:
        pytest.skip(f"no ggml library found in {lib_dir}")
    ggml = ctypes.CDLL(str(candidates[0]))
    ggml.ggml_blck_size.restype = ctypes.c_int64
    ggml.ggml_blck_size.argtypes = [ctypes.c_int]
    ggml.ggml_type_size.restype = ctypes.c_size_t
    ggml.ggml_type_size.argtypes = [ctypes.c_int]
    count = llama_cpp.GGML_TYPE_COUNT
    bundled = {t: (ggml.ggml_blck_size(t), ggml.ggml_type_size(t)) for t in range(count)}
    assert {t: v for t, v in bundled.items() if v[0] > 0} == GGML_TYPES
