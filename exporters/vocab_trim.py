"""VocabTrim: prune a drafter's LM head to the tokens its target actually writes.

After "VocabTrim: Vocabulary Pruning for Efficient Speculative Decoding in LLMs" (2025): a small
drafter spends a large share of each step on its LM head (for the default drafter the Q8_0 output
matrix is 145 MB of its 491 MB, read for every drafted token), yet the target's text uses a small
part of the vocabulary. Keeping the N rows the target uses most makes every draft step cheaper;
tokens outside the kept set are never proposed, which costs only the acceptance of drafts that
needed one.

llama.cpp requires the output matrix to have one row per vocabulary entry (its embeddings mode
still computes the whole head), so the trimmed GGUF has a smaller, self-consistent vocabulary of N
tokens: the kept tokens in target-id order, with token_embd and output sliced by whole rows
(quantized rows slice as raw bytes), merges and special-token ids rewritten to match. The map back
to target ids, and each dropped token's stand-in for the drafter's input (its longest kept prefix,
see `edgespec.formats.vocabmap`), is stored in the file's metadata.

What is always kept: every non-normal token (control, user-defined, byte, unknown), every token a
special-token id points at, and for byte-level BPE vocabularies the 256 single-byte tokens, so
every text stays representable. The remaining places go by frequency in the calibration text;
tokens the calibration never produced are ranked by id, which for a BPE vocabulary is merge order,
roughly the tokenizer's own frequency ranking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgespec.errors import ExportError
from edgespec.exporters.progress import ProgressFactory, progress_bar
from edgespec.fileio import atomic_path, check_free_space, close_quietly, write_errors
from edgespec.formats.vocabmap import KEY_KEEP, PREFIX, VocabMap

# gguf's TokenType values (kept here so that importing this module does not need gguf).
_NORMAL, _UNUSED = 1, 5
_TRIMMED_TENSORS = ("token_embd.weight", "output.weight")


def _byte_chars() -> set[str]:
    """The 256 characters byte-level BPE (GPT-2) uses to spell single bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = set(map(chr, printable))
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.add(chr(256 + extra))
            extra += 1
    return chars


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceVocab:
    """A GGUF's tokenizer, as far as trimming needs it."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    texts: list[str]
    types: np.ndarray  # int32 per token, gguf.TokenType values
    special_ids: dict[str, int]  # tokenizer.ggml.*_token_id

    @property
    def n_vocab(self) -> int:
        return len(self.texts)


def read_vocab(reader: Any) -> SourceVocab:
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise ExportError("the drafter GGUF has no tokenizer (tokenizer.ggml.tokens); it cannot be trimmed")
    tokens = fields["tokenizer.ggml.tokens"]
    texts = [bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data]
    if "tokenizer.ggml.token_type" in fields:
        tt = fields["tokenizer.ggml.token_type"]
        types = np.array([tt.parts[i][0] for i in tt.data], dtype=np.int32)
    else:
        types = np.full(len(texts), _NORMAL, dtype=np.int32)
    model_field = fields.get("tokenizer.ggml.model")
    model = bytes(model_field.parts[model_field.data[0]]).decode() if model_field else "llama"
    special = {
        key: int(field.parts[field.data[0]][0])
        for key, field in fields.items()
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
    }
    return SourceVocab(model, texts, types, special)


def forced_ids(vocab: SourceVocab) -> np.ndarray:
    """Ids every trim keeps, whatever the frequencies say."""
    force = (vocab.types != _NORMAL) & (vocab.types != _UNUSED)
    for token in vocab.special_ids.values():
        if 0 <= token < vocab.n_vocab:
            force[token] = True
    if vocab.model == "gpt2":
        byte_chars = _byte_chars()
        for i, text in enumerate(vocab.texts):
            if len(text) == 1 and text in byte_chars:
                force[i] = True
    return np.flatnonzero(force)


def choose_keep(counts: np.ndarray, vocab: SourceVocab, n_keep: int) -> np.ndarray:
    """The N ids to keep, ascending.

    Args:
        counts: int array (>= vocab.n_vocab entries; extra entries are ignored): how often the
            target produced each id in the calibration text.
        n_keep: N, the trimmed vocabulary size.
    """
    n_vocab = vocab.n_vocab
    forced = forced_ids(vocab)
    if n_keep < len(forced):
        raise ExportError(
            f"keeping {n_keep} tokens: that is smaller than the {len(forced)} tokens every trim keeps "
            "(special, control and byte tokens)"
        )
    if n_keep >= n_vocab:
        raise ExportError(
            f"keeping {n_keep} tokens: not fewer than the vocabulary's {n_vocab}, so nothing to trim"
        )
    counts = np.asarray(counts[:n_vocab], dtype=np.int64)
    if len(counts) < n_vocab:
        counts = np.concatenate([counts, np.zeros(n_vocab - len(counts), dtype=np.int64)])
    ids = np.arange(n_vocab)
    order = np.lexsort((ids, -counts))  # most frequent first, then lower id (BPE merge order)
    chosen = np.zeros(n_vocab, dtype=bool)
    chosen[forced] = True
    room = n_keep - len(forced)
    candidates = order[~chosen[order]]
    chosen[candidates[:room]] = True
    return np.flatnonzero(chosen).astype(np.int32)


def input_map_for(keep: np.ndarray, vocab: SourceVocab) -> np.ndarray:
    """For every source id, the trimmed id the drafter reads in its place (see edgespec.formats.vocabmap).

    Kept ids map to themselves. A dropped id maps to the kept token whose text is the longest
    prefix of its text; failing that (SentencePiece vocabularies without single-character
    pieces), to the byte token of its first byte, else to the first kept normal token.
    """
    position = {vocab.texts[t]: i for i, t in enumerate(keep.tolist())}
    input_map = np.empty(vocab.n_vocab, dtype=np.int32)
    input_map[:] = -1
    input_map[keep] = np.arange(len(keep), dtype=np.int32)
    normal_kept = [i for i, t in enumerate(keep.tolist()) if vocab.types[t] == _NORMAL]
    last_resort = normal_kept[0] if normal_kept else 0
    for token in np.flatnonzero(input_map < 0).tolist():
        text = vocab.texts[token]
        stand_in = -1
        for length in range(len(text) - 1, 0, -1):
            stand_in = position.get(text[:length], -1)
            if stand_in >= 0:
                break
        if stand_in < 0 and text:
            first = text[0].replace("\u2581", " ").encode("utf-8")[0]
            stand_in = position.get(f"<0x{first:02X}>", -1)
        input_map[token] = stand_in if stand_in >= 0 else last_resort
    return input_map


@dataclass(frozen=True)
class TrimReport:
    """What a trim produced.

    Attributes:
        coverage: share of the calibration tokens that are in the kept set (1.0 = every token the
            target produced during calibration can be drafted).
    """

    out: Path
    n_keep: int
    n_source_vocab: int
    n_forced: int
    source_bytes: int
    out_bytes: int
    coverage: float


def trim_gguf(
    source: Path,
    out: Path,
    counts: np.ndarray,
    n_keep: int,
    *,
    target_sha256: str = "",
    frequency_source: str = "",
    progress: ProgressFactory | None = None,
) -> TrimReport:
    """Write a copy of the drafter `source` whose vocabulary and LM head keep only N tokens.

    Args:
        source: the drafter's GGUF.
        out: where to write the trimmed GGUF (atomically: a failed trim leaves nothing there).
        counts: int array, per target id, of calibration frequencies (see count_generated).
        n_keep: N.
        target_sha256, frequency_source: provenance stored in the metadata.
        progress: optional progress factory for the tensor copy.

    Returns:
        TrimReport with sizes and the calibration coverage.
    """
    import gguf

    source = Path(source)
    if not source.is_file():
        raise ExportError(f"drafter not found: {source}")
    try:
        reader = gguf.GGUFReader(str(source), "r")
    except (ValueError, OSError) as exc:
        raise ExportError(f"{source} is not a readable GGUF file: {exc}") from None
    if KEY_KEEP in reader.fields:
        raise ExportError(f"{source} is already trimmed; trim the original drafter instead")
    vocab = read_vocab(reader)
    tensors = {t.name: t for t in reader.tensors}
    for name in _TRIMMED_TENSORS:
        t = tensors.get(name)
        if t is not None and int(t.shape[-1]) != vocab.n_vocab:
            raise ExportError(f"{source}: {name} has {int(t.shape[-1])} rows, the vocabulary {vocab.n_vocab}")
    if "token_embd.weight" not in tensors:
        raise ExportError(
            f"{source} has no token_embd.weight tensor; only llama.cpp text models can be trimmed"
        )

    # Special tokens llama.cpp finds by their text (EOT, EOM, ...) when the file names no id: it
    # searches a hash map, so in a smaller vocabulary it can settle on another candidate (for the
    # default drafter, <|endoftext|> instead of <|im_end|>). Name them explicitly, as detected here.
    detected = _detected_special_ids(source)
    for key, token in detected.items():
        vocab.special_ids.setdefault(key, token)
    keep = choose_keep(counts, vocab, n_keep)
    input_map = input_map_for(keep, vocab)
    vmap = VocabMap(
        keep=keep,
        input_map=input_map,
        source_sha256=sha256_file(source),
        target_sha256=target_sha256,
        frequency_source=frequency_source,
    )
    total = int(np.asarray(counts[: vocab.n_vocab]).sum())
    coverage = float(np.asarray(counts)[keep].sum() / total) if total else 0.0

    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    new_id = {int(t): i for i, t in enumerate(keep.tolist())}
    kept_texts = {vocab.texts[t] for t in keep.tolist()}

    out = Path(out)
    payloads = [
        np.ascontiguousarray(t.data[keep]) if t.name in _TRIMMED_TENSORS else t.data for t in reader.tensors
    ]
    total_bytes = sum(p.nbytes for p in payloads)
    check_free_space(out, total_bytes)  # before writing, not when the disk is full
    with write_errors(out), atomic_path(out, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key == "general.architecture" or key.startswith(PREFIX):
                    continue
                _copy_field(writer, key, field, keep, new_id, kept_texts, arch, n_keep)
            for key, token in detected.items():
                if key not in reader.fields:
                    writer.add_uint32(key, new_id[token])
            if "general.name" not in reader.fields:
                writer.add_name(f"{source.stem} (VocabTrim {n_keep})")
            for key, value in vmap.metadata().items():
                if isinstance(value, np.ndarray):
                    writer.add_key_value(
                        key, value.tolist(), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32
                    )
                elif isinstance(value, int):
                    writer.add_uint32(key, value)
                else:
                    writer.add_string(key, str(value))

            for t, data in zip(reader.tensors, payloads, strict=True):
                writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw_dtype=t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress_bar(progress, total_bytes, f"writing {out.name}") as bar:
                for data in payloads:
                    writer.write_tensor_data(data)
                    bar.update(data.nbytes)
        except BaseException:
            close_quietly(writer)  # the file is removed next; a second error must not hide the first
            raise
        writer.close()
    return TrimReport(
        out=out,
        n_keep=n_keep,
        n_source_vocab=vocab.n_vocab,
        n_forced=len(forced_ids(vocab)),
        source_bytes=source.stat().st_size,
        out_bytes=out.stat().st_size,
        coverage=coverage,
    )


def vocab_map_for(
    target: Path,
    counts: np.ndarray,
    n_keep: int,
    *,
    target_sha256: str = "",
    frequency_source: str = "",
) -> VocabMap:
    """The map a trim to N tokens would write, from the target's vocabulary (the drafter shares it):
    for exporters that trim the head of another format (ONNX)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(target), "r")
    except (ValueError, OSError) as exc:
        raise ExportError(f"{target} is not a readable GGUF file: {exc}") from None
    vocab = read_vocab(reader)
    for key, token in _detected_special_ids(Path(target)).items():
        vocab.special_ids.setdefault(key, token)
    keep = choose_keep(counts, vocab, n_keep)
    return VocabMap(
        keep=keep,
        input_map=input_map_for(keep, vocab),
        target_sha256=target_sha256,
        frequency_source=frequency_source,
    )


def _detected_special_ids(path: Path) -> dict[str, int]:
    """BOS/EOS/EOT/PAD ids as llama.cpp resolves them for this file (read vocabulary-only)."""
    import llama_cpp as ll

    from edgespec.errors import ModelLoadError
    from edgespec.runtimes.llama_cpp import vocab_info, vocab_only

    try:
        with vocab_only(path) as v:
            info = vocab_info(v)
            pad = int(ll.llama_vocab_pad(v))
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    found = {
        "tokenizer.ggml.bos_token_id": info.bos,
        "tokenizer.ggml.eos_token_id": info.eos,
        "tokenizer.ggml.eot_token_id": info.eot,
        "tokenizer.ggml.padding_token_id": pad if 0 <= pad < info.n_vocab else None,
    }
    return {key: token for key, token in found.items() if token is not None}


def _copy_field(
    writer: Any,
    key: str,
    field: Any,
    keep: np.ndarray,
    new_id: dict[int, int],
    kept_texts: set[str],
    arch: str,
    n_keep: int,
) -> None:
    import gguf

    types = field.types
    if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        values = field.contents()
        writer.add_key_value(key, [values[t] for t in keep.tolist()], types[0], types[-1])
        return
    if key == "tokenizer.ggml.merges":
        merges = []
        for merge in field.contents():
            left, _, right = merge.partition(" ")
            if left in kept_texts and right in kept_texts and left + right in kept_texts:
                merges.append(merge)
        writer.add_key_value(key, merges, types[0], types[-1])
        return
    if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
        old = int(field.contents())
        writer.add_key_value(key, new_id.get(old, 0), types[0])
        return
    if key == f"{arch}.vocab_size":
        writer.add_key_value(key, n_keep, types[0])
        return
    if key == "general.name":
        writer.add_key_value(key, f"{field.contents()} (VocabTrim {n_keep})", types[0])
        return
    if types[0] == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(key, field.contents(), types[0], types[-1])
    else:
        writer.add_key_value(key, field.contents(), types[0])


# ----------------------------------------------------------------------------------- frequencies


def count_corpus(target: Any, texts: Sequence[str]) -> np.ndarray:
    """Token frequencies of a given corpus, tokenized by the target.

    Args:
        target: a loaded target Runtime (only its tokenizer is used).
        texts: documents.

    Returns:
        int64 array (target n_vocab,).
    """
    counts = np.zeros(target.vocab.n_vocab, dtype=np.int64)
    for text in texts:
        tokens = target.tokenize(text, add_special=False, parse_special=False)
        np.add.at(counts, np.asarray(tokens, dtype=np.int64), 1)
    return counts


def count_generated(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Token frequencies of what the target writes (greedy, target-only) for each prompt.

    Args:
        engine: a SpeculativeEngine (its drafter is not used: generation is target-only).
        prompts: token ids of each chat-formatted prompt.
        max_tokens: M, tokens generated per prompt (fewer if the target stops).
        progress: called with 1 after each prompt.

    Returns:
        int64 array (target n_vocab,).
    """
    from edgespec.engine import GenerationSettings

    counts = np.zeros(engine.target.vocab.n_vocab, dtype=np.int64)
    settings = GenerationSettings(max_tokens=max_tokens, draft_max=0)
    for prompt in prompts:
        result = engine.generate(prompt, settings).run()
        np.add.at(counts, np.asarray(result.tokens, dtype=np.int64), 1)
        if progress:
            progress(1)
    return counts


def count_prompt(tokens: Sequence[int], n_vocab: int) -> np.ndarray:
    """Token frequencies of one prompt (ids outside the vocabulary are ignored)."""
    ids = np.asarray(tokens, dtype=np.int64)
    return np.bincount(ids[(ids >= 0) & (ids < n_vocab)], minlength=n_vocab)


__all__ = [
    "TrimReport",
    "choose_keep",
    "count_corpus",
    "count_generated",
    "count_prompt",
    "input_map_for",
    "read_vocab",
    "sha256_file",
    "trim_gguf",
]
