"""A runtime over llama-cpp-python's low-level C API.

Two kernel settings. `kernels="fast"` (the default) keeps llama.cpp's own defaults, those of
llama-cpp-python's `Llama` (flash attention off, F16 keys and values, batches of up to 512 rows):
the kernels everyone else runs, whose rounding depends on the batch size, so that a verification
pass can break a greedy near-tie otherwise than single-token decoding would (speculative output is
then the target's in distribution, not token for token). `kernels="exact"` makes every row of a
verification pass bit-identical to single-token decoding: on the CPU, llama.cpp (0.3.36) picks
kernels by batch size (repacked K-quant weights use a gemv below 4 rows and a gemm from 4; the
tiled K-quant matmul starts at 8 rows; single-query flash attention splits the KV cache across
threads once it holds 512 cells), and only some configurations avoid every such switch. Which
ones is not assumed: `invariance.probe` measures them on the loaded model (flash attention on,
K and V types, the largest row-invariant batch), the fastest passing one is used, and verification
passes are sent in pieces of at most that many rows. Where none passes, asking for `exact` is an
error that says why.

Why not `llama_cpp.Llama`: with `logits_all=True` it keeps an n_ctx × n_vocab float table (about
2.5 GB for a 152k vocabulary at a 4k context) and copies rows into it. Here one `llama_batch` is
reused, only the rows the caller asks for are computed (`batch.logits[i]`), and they are read in
place with `llama_get_logits_ith`. Rolling back is `llama_memory_seq_rm` on sequence 0.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgespec.errors import (
    ModelLoadError,
    PromptTooLongError,
    RuntimeFailure,
    SettingsError,
    encode_utf8,
)
from edgespec.formats.gguf import check_gguf
from edgespec.formats.vocabmap import KEY_TARGET_N_VOCAB, VocabMap
from edgespec.runtimes import native as _native_threads
from edgespec.runtimes.base import LogitRows, RuntimeBase, RuntimeSettings, VocabInfo
from edgespec.runtimes.invariance import GGML_TYPES, ProbeResult, probe_or_load

try:
    import llama_cpp as _ll
except ImportError as exc:  # pragma: no cover - llama-cpp-python is a hard dependency
    raise ModelLoadError(f"llama-cpp-python is not importable ({exc}); reinstall edgespec with pip") from exc

_VOCAB_KINDS = {
    _ll.LLAMA_VOCAB_TYPE_NONE: "none",
    _ll.LLAMA_VOCAB_TYPE_SPM: "spm",
    _ll.LLAMA_VOCAB_TYPE_BPE: "bpe",
    _ll.LLAMA_VOCAB_TYPE_WPM: "wpm",
    _ll.LLAMA_VOCAB_TYPE_UGM: "ugm",
    _ll.LLAMA_VOCAB_TYPE_RWKV: "rwkv",
}

_FLASH_ATTN = {
    "auto": _ll.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": _ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": _ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


# ggml_log_level in the bundled ggml: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5. (The
# comment in llama-cpp-python's _logger.py gives an older order, INFO 1, WARN 2, ERROR 3, with
# which INFO lines were kept here and ERROR lines, the ones that say why a load failed, dropped.)
_LOG_KEPT = (3, 4)
_LOG_CONT = 5


class _Log:
    """llama.cpp's log sink: silent unless verbose, but keeps recent warnings and errors.

    llama.cpp reports *why* a load failed only through its log (e.g. "tensor data is not within the
    file bounds"), so the last lines are kept to put the reason into our own one-line error.
    """

    def __init__(self) -> None:
        self.verbose = False
        self.recent: collections.deque[str] = collections.deque(maxlen=16)
        self._lock = threading.Lock()
        self._partial = ""
        self._level = 0
        # The ctypes callback object must outlive every call llama.cpp makes through it.
        self._callback = _ll.llama_log_callback(self._on_log)
        _ll.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        if self.verbose:
            os.write(2, text)
        with self._lock:
            # CONT continues the previous message at its level.
            if level != _LOG_CONT:
                self._level = level
            self._partial += message
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                line = line.strip()
                if line and self._level in _LOG_KEPT:
                    self.recent.append(line)

    def clear(self) -> None:
        with self._lock:
            self.recent.clear()

    def reason(self) -> str:
        """The most telling recent log line, for an error message."""
        with self._lock:
            lines = list(self.recent)
        for line in reversed(lines):
            # "llama_model_load: error loading model: <why>", followed by a generic "failed to load"
            _, found, why = line.partition("error loading model:")
            if found and why.strip():
                return why.strip()
        for line in reversed(lines):
            lowered = line.lower()
            if any(word in lowered for word in ("error", "failed", "invalid", "unknown", "not within")):
                return line
        return lines[-1] if lines else "no reason given by llama.cpp"


_init_lock = threading.Lock()
_log: _Log | None = None


def _backend() -> _Log:
    global _log
    with _init_lock:
        if _log is None:
            _log = _Log()
            _ll.llama_backend_init()
        return _log


def backend() -> _Log:
    """Initialise llama.cpp once and return its log sink (quiet; keeps the last warnings/errors)."""
    return _backend()


@contextlib.contextmanager
def vocab_only(path: str | os.PathLike[str]) -> Iterator[Any]:
    """A llama.cpp model loaded vocabulary-only (no weights): yields its `llama_vocab` pointer.

    For exporters that need llama.cpp's own view of a GGUF's tokens (special ids it detects by
    text, token attributes) without loading a model.
    """
    check_gguf(path)
    log = _backend()
    params = _ll.llama_model_default_params()
    params.vocab_only = True
    model = _ll.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp cannot read the vocabulary of {path}: {log.reason()}")
    try:
        yield _ll.llama_model_get_vocab(model)
    finally:
        _ll.llama_model_free(model)


@contextlib.contextmanager
def interrupt_after_native_call() -> Iterator[threading.Event]:
    """Hold Ctrl-C back while a native call that calls into Python (log lines, load progress)
    runs, and raise it once the call has returned.

    A KeyboardInterrupt raised inside a ctypes callback is printed as "Exception ignored" and
    dropped, and the call goes on as if nothing was pressed; so SIGINT only sets the yielded
    event (which a callback may poll to stop early) while the block runs. After the block, a
    press becomes KeyboardInterrupt, replacing whatever the block raised. Outside the main thread,
    or when SIGINT is not Python's default handler, nothing changes.
    """
    pressed = threading.Event()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed.is_set():
            raise KeyboardInterrupt


def vocab_info(v: Any) -> VocabInfo:
    """What the engine needs to know about a loaded vocabulary (a `llama_vocab` pointer)."""
    n_vocab = int(_ll.llama_vocab_n_tokens(v))

    def special(value: int) -> int | None:
        return value if 0 <= value < n_vocab else None

    eog = frozenset(t for t in range(n_vocab) if _ll.llama_vocab_is_eog(v, t))
    return VocabInfo(
        kind=_VOCAB_KINDS.get(int(_ll.llama_vocab_type(v)), f"type-{_ll.llama_vocab_type(v)}"),
        n_vocab=n_vocab,
        bos=special(int(_ll.llama_vocab_bos(v))),
        eos=special(int(_ll.llama_vocab_eos(v))),
        eot=special(int(_ll.llama_vocab_eot(v))),
        add_bos=bool(_ll.llama_vocab_get_add_bos(v)),
        eog=eog,
    )


def default_threads() -> int:
    """Physical cores: llama.cpp's decoding is memory-bound and slows down on hyper-threads."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


class LlamaCppRuntime(RuntimeBase):
    """One GGUF model and one llama.cpp context holding sequence 0.

    Args:
        path: GGUF file.
        settings: context size, threads, offload, flash attention, verbosity.
    """

    def __init__(self, path: str | os.PathLike[str], settings: RuntimeSettings | None = None) -> None:
        self.path = Path(path)
        self.settings = settings or RuntimeSettings()
        if self.settings.n_ctx < 8:
            raise SettingsError(f"context size must be at least 8 tokens, got {self.settings.n_ctx}")
        if self.settings.n_batch < 1:
            raise SettingsError(f"batch size must be at least 1, got {self.settings.n_batch}")
        if self.settings.n_seq < 1:
            raise SettingsError(f"a context holds at least 1 sequence, got {self.settings.n_seq}")
        # Exact kernels run flash attention whatever `flash_attn` says: it is part of the
        # configuration the invariance probe verified.
        exact = self.settings.kernels == "exact"
        self._model = None
        self._ctx = None
        self._batch = None
        # every llama_decode of this context on one thread (see `edgespec.runtimes.native`)
        self._native, self._own_native = _native_threads.for_layers(self.settings.gpu_layers)
        # llama.cpp stops the process on some malformed files: refuse those with a message first.
        check_gguf(self.path)
        log = _backend()
        log.verbose = self.settings.verbose
        log.clear()

        mparams = _ll.llama_model_default_params()
        mparams.n_gpu_layers = self.settings.gpu_layers
        # Memory-mapped, as llama-cpp-python's `Llama` loads (llama.cpp's own default, "auto",
        # decoded 3-5% slower here).
        mparams.load_mode = _ll.LLAMA_LOAD_MODE_MMAP
        try:
            with interrupt_after_native_call() as pressed:
                # Ctrl-C stops the load at its next progress report (returning false aborts it).
                keep_loading = _ll.llama_progress_callback(lambda _progress, _user: not pressed.is_set())
                mparams.progress_callback = keep_loading
                self._model = _ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        except KeyboardInterrupt:
            self.close()
            raise
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {self.path}: {log.reason()}")

        threads = self.settings.n_threads or default_threads()
        threads_batch = self.settings.n_threads_batch or threads
        cparams = _ll.llama_context_default_params()
        n_seq = self.settings.n_seq
        cparams.n_ctx = self.settings.n_ctx * n_seq  # split evenly among the sequences' streams
        cparams.n_batch = self.settings.n_batch
        cparams.n_ubatch = self.settings.n_batch
        cparams.n_seq_max = n_seq
        if n_seq > 1:
            cparams.kv_unified = False
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        #: the invariance probe's result (exact kernels only)
        self.invariance: ProbeResult | None = None
        self._max_rows = self.settings.n_batch
        if exact:
            self.invariance = self._probe(threads, threads_batch)
            chosen = self.invariance.chosen
            assert chosen is not None
            cparams.flash_attn_type = _FLASH_ATTN["on"]
            cparams.type_k = GGML_TYPES[chosen.type_k]
            cparams.type_v = GGML_TYPES[chosen.type_v]
            self._max_rows = chosen.max_rows
        else:
            cparams.flash_attn_type = _FLASH_ATTN[self.settings.flash_attn]
        cparams.no_perf = True
        try:
            with interrupt_after_native_call():
                self._ctx = _ll.llama_init_from_model(self._model, cparams)
        except KeyboardInterrupt:
            self.close()
            raise
        if not self._ctx:
            self.close()
            raise ModelLoadError(f"llama.cpp could not create a context for {self.path}: {log.reason()}")
        self._mem = _ll.llama_get_memory(self._ctx)
        # llama.cpp may round the context up (to 256 cells); the limit is what the user asked for.
        self._n_ctx = min(self.settings.n_ctx, int(_ll.llama_n_ctx_seq(self._ctx)))
        self._vocab_p = _ll.llama_model_get_vocab(self._model)
        self.vocab = vocab_info(self._vocab_p)
        # A VocabTrim drafter's map back to its target's ids (None for an ordinary model). The
        # scalar key is visible through llama.cpp; the arrays are read from the file's header.
        if self.metadata(KEY_TARGET_N_VOCAB) is not None:
            self.vocab_map = VocabMap.from_gguf(self.path)
            if self.vocab_map is None or self.vocab_map.n_keep != self.vocab.n_vocab:
                self.close()
                raise ModelLoadError(
                    f"{self.path}: its vocabulary map does not match its {self.vocab.n_vocab} tokens"
                )
        self._n_batch = self.settings.n_batch
        self._batch = _ll.llama_batch_init(self._n_batch, 0, 1)
        for i in range(self._n_batch):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._held: list[int] = []  # sequence 0's token ids in the cache, in position order
        # Every sequence's tokens; sequence 0's list is `_held`.
        self._seqs: list[list[int]] = [self._held] + [[] for _ in range(n_seq - 1)]
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._piece_lock = threading.Lock()

    def _probe(self, threads: int, threads_batch: int) -> ProbeResult:
        """The row-invariant configuration for this model here (cached), or a SettingsError."""
        from edgespec.fileio import user_config_dir

        result = probe_or_load(
            self._model,
            self.path,
            gpu_layers=self.settings.gpu_layers,
            threads=threads,
            threads_batch=threads_batch,
            cache_dir=user_config_dir() / "invariance",
        )
        if not result.passed:
            self.close()
            raise SettingsError(f"exact output is not available for {self.path.name}: {result.failure()}")
        return result

    @property
    def guarantee(self) -> str:
        """ "exact" (row-invariant kernels, verified) or "distribution" (llama.cpp's kernels)."""
        return "exact" if self.invariance is not None else "distribution"

    # ----------------------------------------------------------------------------------- vocab

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = encode_utf8(text, "the text")
        capacity = len(data) + 8
        while True:
            buf = (_ll.llama_token * capacity)()
            n = _ll.llama_tokenize(self._vocab_p, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            with self._piece_lock:  # one buffer, and threads generating side by side
                buf = self._piece_buf
                n = _ll.llama_token_to_piece(self._vocab_p, token, buf, len(buf), 0, False)
                if n < 0:
                    buf = ctypes.create_string_buffer(-n)
                    n = _ll.llama_token_to_piece(self._vocab_p, token, buf, len(buf), 0, False)
                piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def token_text(self, token: int) -> bytes:
        return _ll.llama_vocab_get_text(self._vocab_p, token) or b""

    def is_special(self, token: int) -> bool:
        attr = _ll.llama_vocab_get_attr(self._vocab_p, token)
        return bool(attr & (_ll.LLAMA_TOKEN_ATTR_CONTROL | _ll.LLAMA_TOKEN_ATTR_USER_DEFINED))

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = _ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = _ll.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    # ----------------------------------------------------------------------------------- state

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_past(self) -> int:
        return len(self._held)

    @property
    def tokens(self) -> Sequence[int]:
        """The token ids in the KV cache, positions 0 … n_past-1 (a read-only view)."""
        return tuple(self._held)

    def eval(self, tokens: Sequence[int], logits: LogitRows = "last", seq: int = 0) -> np.ndarray:
        """As `Runtime.eval`, for sequence `seq` (see `RuntimeSettings.n_seq`)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("eval needs at least one token")
        held = len(self._seqs[self._seq_index(seq)])
        if held + n > self._n_ctx:
            raise PromptTooLongError(f"{held + n} tokens do not fit the context of {self._n_ctx} tokens")
        n_vocab = self.vocab.n_vocab
        for token in tokens:
            if not 0 <= token < n_vocab:
                raise ValueError(f"token id {token} is outside the vocabulary of {n_vocab} tokens")
        if logits == "all" and n > self._max_rows:
            # Pieces small enough for the row-invariant kernels; rows are copied out of each piece
            # because the next llama_decode overwrites the logits buffer.
            out = np.empty((n, n_vocab), dtype=np.float32)
            for start in range(0, n, self._max_rows):
                piece = tokens[start : start + self._max_rows]
                out[start : start + len(piece)] = self._decode(piece, "all", seq)
            return out
        return self._decode(tokens, logits, seq)

    def _decode(self, tokens: Sequence[int], logits: LogitRows, seq: int) -> np.ndarray:
        n = len(tokens)
        n_vocab = self.vocab.n_vocab
        batch = self._batch
        if batch is None:
            raise RuntimeFailure(f"{self.path.name} is closed")
        start = 0
        count = 0
        while start < n:
            count = min(self._n_batch, n - start)
            last_chunk = start + count == n
            held = self._seqs[seq]
            pos = len(held)
            for i in range(count):
                batch.token[i] = tokens[start + i]
                batch.pos[i] = pos + i
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits == "all" and last_chunk
            if last_chunk and logits == "last":
                batch.logits[count - 1] = True
            batch.n_tokens = count
            try:
                status = self._native.call(_ll.llama_decode, self._ctx, batch)
                if status != 0:
                    # llama_decode leaves the cache as it was for status 1 / -1; drop partial
                    # ubatches for the fatal codes so that n_past stays true.
                    raise RuntimeFailure(f"llama_decode failed with status {status}: {_backend().reason()}")
                held.extend(tokens[start : start + count])
            except BaseException:
                # Also a Ctrl-C that lands between the decode and the bookkeeping: forget the cells
                # this chunk added, so that the cache, n_past and the token record agree.
                self._forget_seq_from(seq, pos)
                raise
            start += count
        if logits == "none":
            return np.empty((0, n_vocab), dtype=np.float32)
        rows = n if logits == "all" else 1
        first = count - rows  # batch index of the first requested row, within the last chunk
        ptr = _ll.llama_get_logits_ith(self._ctx, first)
        if not ptr:
            raise RuntimeFailure("llama.cpp returned no logits for the requested row")
        # Rows flagged in one batch are stored contiguously, in batch order.
        return np.ctypeslib.as_array(ptr, shape=(rows, n_vocab))

    # ----------------------------------------------------------------------- several sequences

    @property
    def n_seq(self) -> int:
        return len(self._seqs)

    def seq_tokens(self, seq: int) -> Sequence[int]:
        """The token ids sequence `seq` holds, in position order (a read-only view)."""
        return tuple(self._seqs[self._seq_index(seq)])

    @property
    def batch_rows(self) -> int:
        """The most rows one pass may hold with every row computed as in a pass of its own: the
        invariance probe's max_rows under exact kernels, else the batch size."""
        return self._max_rows

    def eval_many(
        self, parts: Sequence[tuple[int, Sequence[int]]], logits: LogitRows | Sequence[LogitRows] = "all"
    ) -> list[np.ndarray]:
        """Evaluate several sequences' new tokens in one `llama_decode`: each part is (sequence,
        tokens), appended at that sequence's end. Returns each part's logits rows ("all", its
        "last", or "none": no rows; one mode for every part, or one per part), copied. All the
        parts together must fit one batch (`n_batch` tokens), and a sequence appears at most once.
        On failure no sequence keeps any of the new tokens.

        Whether a row comes out bit for bit as it would alone depends on the kernels and on the
        batch's shape: `benchmarks/batch_cost.py` measures it; nothing here promises it.
        """
        if not parts:
            return []
        modes = [logits] * len(parts) if isinstance(logits, str) else list(logits)
        if len(modes) != len(parts) or not set(modes) <= {"all", "last", "none"}:
            raise ValueError("eval_many takes one of 'all', 'last' or 'none' for every part")
        seqs = [self._seq_index(seq) for seq, _ in parts]
        if len(set(seqs)) != len(seqs):
            raise ValueError("a sequence appears twice in one eval_many")
        total = sum(len(tokens) for _, tokens in parts)
        if not all(len(tokens) for _, tokens in parts):
            raise ValueError("every part of eval_many needs at least one token")
        if total > self._n_batch:
            raise ValueError(f"{total} tokens do not fit one batch of {self._n_batch}")
        n_vocab = self.vocab.n_vocab
        for seq, (_, tokens) in zip(seqs, parts, strict=True):
            held = len(self._seqs[seq])
            if held + len(tokens) > self._n_ctx:
                raise PromptTooLongError(
                    f"sequence {seq}: {held + len(tokens)} tokens do not fit its context of {self._n_ctx}"
                )
            if not all(0 <= t < n_vocab for t in tokens):
                raise ValueError(f"sequence {seq}: a token id is outside the vocabulary of {n_vocab} tokens")
        batch = self._batch
        if batch is None:
            raise RuntimeFailure(f"{self.path.name} is closed")
        # The batch holds the parts in sequence order: with a KV stream per sequence, llama.cpp
        # splits a batch whose sequences are out of order into several ubatches (four one-row
        # parts out of order cost ~1.4 times as much as in order: `benchmarks/batch_steps.py`).
        order = sorted(range(len(parts)), key=seqs.__getitem__)
        i = 0
        counts = []
        first_row = -1
        for seq, (_, tokens), mode in ((seqs[j], parts[j], modes[j]) for j in order):
            pos = len(self._seqs[seq])
            for j, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = pos + j
                batch.seq_id[i][0] = seq
                batch.logits[i] = mode == "all" or (mode == "last" and j == len(tokens) - 1)
                if batch.logits[i] and first_row < 0:
                    first_row = i
                i += 1
            counts.append({"all": len(tokens), "last": 1, "none": 0}[mode])
        batch.n_tokens = total
        before = [len(self._seqs[seq]) for seq in seqs]
        try:
            status = self._native.call(_ll.llama_decode, self._ctx, batch)
            if status != 0:
                raise RuntimeFailure(f"llama_decode failed with status {status}: {_backend().reason()}")
            for seq, (_, tokens) in zip(seqs, parts, strict=True):
                self._seqs[seq].extend(tokens)
        except BaseException:
            for seq, n in zip(seqs, before, strict=True):
                self._forget_seq_from(seq, n)
            raise
        rows = sum(counts)
        if not rows:
            return [np.empty((0, n_vocab), dtype=np.float32) for _ in parts]
        first = _ll.llama_get_logits_ith(self._ctx, first_row)
        if not first:
            raise RuntimeFailure("llama.cpp returned no logits for the requested rows")
        out = np.ctypeslib.as_array(first, shape=(rows, n_vocab))  # flagged rows, in batch order
        split = np.cumsum(counts)[:-1]
        results: list[np.ndarray] = [out[:0]] * len(parts)
        for j, part in zip(order, np.split(out, split), strict=True):
            results[j] = part.copy()
        return results

    def truncate_seq(self, seq: int, n: int) -> None:
        """Keep the first `n` tokens of sequence `seq`; the other sequences are untouched."""
        index = self._seq_index(seq)
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        if n >= len(self._seqs[index]):
            return
        if not _ll.llama_memory_seq_rm(self._mem, index, n, -1):
            raise RuntimeFailure(f"llama.cpp could not roll sequence {index} back to {n} tokens")
        del self._seqs[index][n:]

    def _seq_index(self, seq: int) -> int:
        if not 0 <= seq < len(self._seqs):
            raise ValueError(f"no sequence {seq}: this context holds {len(self._seqs)}")
        return seq

    def _forget_seq_from(self, seq: int, n: int) -> None:
        _ll.llama_memory_seq_rm(self._mem, seq, n, -1)
        del self._seqs[seq][n:]

    def truncate(self, n: int, seq: int = 0) -> None:
        """As `Runtime.truncate`, for sequence `seq`."""
        self.truncate_seq(seq, n)

    def close(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None and self._own_native:
            native.stop()
        if self._batch is not None:
            _ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            _ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            _ll.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self.close()
