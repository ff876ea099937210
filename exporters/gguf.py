"""Hugging Face checkpoint → GGUF, then llama.cpp's own quantizer.

`export_gguf` reads a checkpoint directory (config.json, safetensors weights, tokenizer.json and
tokenizer_config.json) of a `LlamaForCausalLM` or `Qwen2ForCausalLM` and writes one GGUF file that
llama.cpp loads: architecture hyper-parameters, the weights under llama.cpp's tensor names, and a
byte-level BPE tokenizer with its merges, special tokens and chat template.

F32, F16 and BF16 are written here directly (1-D tensors, i.e. norms and biases, always F32, as
llama.cpp's converter does). Every other type (Q8_0, Q4_K_M, ...) is made by writing an F16 file
first and running `llama_model_quantize` on it, so the quantized blocks and the per-tensor type
choices of a "mixture" such as Q4_K_M are exactly llama.cpp's.

What follows llama.cpp's `convert_hf_to_gguf.py` (learned from it, not copied):
- llama's q and k projections are permuted: HF rotates the two halves of each head (NeoX order),
  llama.cpp's LLAMA architecture rotates adjacent pairs. Qwen2 runs NeoX RoPE in llama.cpp, so its
  weights are written as they are.
- Tied embeddings: no `output.weight`; llama.cpp then reuses `token_embd.weight`.
- A vocabulary smaller than the embedding matrix is padded with UNUSED `[PAD<id>]` tokens; added
  special tokens (and added tokens that look like `<|...|>`) are CONTROL tokens.
- The pre-tokenizer name, which tells llama.cpp how to split text before BPE, is recognised from the
  split regex in tokenizer.json rather than from a hash of sample output.

The weights are read straight from the safetensors files through a memory map: no torch needed, and
BF16 (which numpy cannot represent) is widened to F32 on the fly. Tensors are converted and written
one at a time, so memory stays near the size of the largest tensor.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgespec.errors import ExportError
from edgespec.exporters.progress import ProgressFactory, progress_bar
from edgespec.fileio import atomic_path, close_quietly, free_bytes, size_text, write_errors

__all__ = ["ARCHITECTURES", "DIRECT_QUANTS", "ExportReport", "export_gguf", "quant_names"]

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
"""HF `architectures[0]` → llama.cpp architecture name."""

DIRECT_QUANTS = ("F32", "F16", "BF16")
"""Types written by this module; any other quant goes through llama.cpp's quantizer."""

_LLAMA_QUANTS = (
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_0",
    "Q5_1",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_0",
    "Q4_1",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
)
"""llama.cpp file types that need no importance matrix (the IQ types do)."""

# The split regexes of tokenizer.json (HF spelling) → llama.cpp's pre-tokenizer name.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class ExportReport:
    """What `export_gguf` wrote.

    Attributes:
        path: the GGUF file.
        architecture: llama.cpp architecture ("llama" or "qwen2").
        quant: the file type asked for ("F16", "Q4_K_M", ...).
        n_tensors: tensors in the file.
        n_params: parameters (elements) over all tensors.
        n_vocab: vocabulary size, padding tokens included (the logits width).
        tokenizer: `tokenizer.ggml.model` ("gpt2" for byte-level BPE).
        pre_tokenizer: `tokenizer.ggml.pre` ("qwen2", "llama-bpe", "gpt-2").
        chat_template: whether a chat template was carried over.
        file_size: bytes on disk.
        seconds: wall time of the whole export.
    """

    path: Path
    architecture: str
    quant: str
    n_tensors: int
    n_params: int
    n_vocab: int
    tokenizer: str
    pre_tokenizer: str
    chat_template: bool
    file_size: int
    seconds: float


def quant_names() -> tuple[str, ...]:
    """Every quant name `export_gguf` accepts, direct types first."""
    return DIRECT_QUANTS + _LLAMA_QUANTS


def _llama_ftype(quant: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}"))


def _check_quant(quant: str) -> str:
    name = quant.upper()
    if name not in quant_names():
        raise ExportError(f"unknown quant {quant!r}; choose one of {', '.join(quant_names())}")
    return name


# ------------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(
            f"{path.name} not found in {path.parent}; is this a Hugging Face checkpoint folder?"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return data


@dataclass(frozen=True)
class _TensorSource:
    """Where one checkpoint tensor lives inside a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _safetensors_index(path: Path) -> dict[str, _TensorSource]:
    """Parse a safetensors header: 8-byte little-endian length, then a JSON table of tensors."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(handle.read(size))
        file_size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not a readable safetensors file ({exc})") from exc
    base = 8 + size
    out: dict[str, _TensorSource] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (base + int(x) for x in info["data_offsets"])
        if end > file_size:
            raise ExportError(f"{path} is truncated: tensor {name} ends past the end of the file")
        out[name] = _TensorSource(path, info["dtype"], tuple(int(d) for d in info["shape"]), start, end)
    return out


def _find_weights(model_dir: Path) -> dict[str, _TensorSource]:
    """Every tensor of the checkpoint, single-file or sharded."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {bins[0]}: re-save with save_pretrained(safe_serialization=True))" if bins else ""
        raise ExportError(
            f"model.safetensors (or model.safetensors.index.json) not found in {model_dir}{hint}"
        )
    tensors: dict[str, _TensorSource] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise ExportError(
                f"weight shard {name} listed in model.safetensors.index.json not found in {model_dir}"
            )
        tensors.update(_safetensors_index(path))
    return tensors


def _load(source: _TensorSource, maps: dict[Path, np.memmap]) -> np.ndarray:
    """The tensor as float32 (BF16 widened), backed by the memory map where no conversion is needed."""
    kind = _SAFETENSORS_DTYPES.get(source.dtype)
    if kind is None:
        raise ExportError(
            f"{source.file.name} holds {source.dtype} weights; only F32, F16 and BF16 are supported"
        )
    raw = maps.get(source.file)
    if raw is None:
        raw = maps[source.file] = np.memmap(source.file, dtype=np.uint8, mode="r")
    data = np.asarray(raw[source.start : source.end]).view(kind).reshape(source.shape)
    if source.dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------ hparams


@dataclass(frozen=True)
class _HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rope_theta: float
    rms_eps: float
    rope: dict[str, Any]
    tied: bool


def _hparams(config: dict[str, Any], config_path: Path) -> _HParams:
    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs else config.get("model_type", "?")
    arch = ARCHITECTURES.get(hf_arch)
    if arch is None:
        raise ExportError(
            f"unsupported architecture {hf_arch} in {config_path}; GGUF export supports "
            f"{', '.join(ARCHITECTURES)}"
        )
    if arch == "qwen2" and config.get("use_sliding_window"):
        raise ExportError(
            f"{config_path}: Qwen2 sliding-window attention is not supported by llama.cpp's qwen2"
        )

    def need(key: str) -> int:
        value = config.get(key)
        if not isinstance(value, int) or value <= 0:
            raise ExportError(f"{config_path} lacks a positive integer {key!r}")
        return value

    n_embd = need("hidden_size")
    n_head = need("num_attention_heads")
    # transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta + rope_scaling.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float):
        raise ExportError(f"{config_path}: rope_theta is {theta!r}, not a number")
    return _HParams(
        arch=arch,
        n_layer=need("num_hidden_layers"),
        n_embd=n_embd,
        n_ff=need("intermediate_size"),
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or n_embd // n_head,
        n_ctx=need("max_position_embeddings"),
        n_vocab=need("vocab_size"),
        rope_theta=float(theta),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope,
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_freqs_llama3(hp: _HParams) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1+'s "llama3" RoPE scaling, stored as `rope_freqs.weight`."""
    rope = hp.rope
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def _add_hparams(writer: Any, hp: _HParams, file_type: int, name: str) -> list[tuple[str, np.ndarray]]:
    """Write the architecture keys; returns extra generated tensors (llama3 rope factors)."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_file_type(file_type)
    extra: list[tuple[str, np.ndarray]] = []
    rope_type = str(hp.rope.get("rope_type", hp.rope.get("type", "default"))).lower()
    factor = hp.rope.get("factor")
    if rope_type == "default":
        pass
    elif rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        orig = hp.rope.get("original_max_position_embeddings")
        if orig is not None:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    elif rope_type == "llama3" and hp.arch == "llama":
        extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_freqs_llama3(hp)))
    else:
        raise ExportError(
            f"unsupported RoPE scaling {hp.rope!r}; supported: none, linear, yarn, llama3 (llama)"
        )
    return extra


# ------------------------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    pre: str


def _pre_tokenizer_name(tokenizer: dict[str, Any], path: Path) -> str:
    """llama.cpp's name for the way tokenizer.json splits text before BPE."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not byte_level:
        raise ExportError(
            f"{path} is not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer); "
            f"only byte-level BPE tokenizers (Qwen2, Llama 3 style) are supported"
        )
    if not splits and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        name = _PRE_TOKENIZERS.get(regex)
        if name is not None:
            return name
        raise ExportError(
            f"{path} splits text with a regex llama.cpp is not known to reproduce ({regex!r:.80}); "
            f"supported: the Qwen2, Llama 3 and GPT-2 pre-tokenizers"
        )
    raise ExportError(
        f"{path} has an unsupported pre-tokenizer layout; supported: Qwen2, Llama 3, GPT-2 style"
    )


def _read_vocab(model_dir: Path, n_vocab: int) -> _Vocab:
    """Tokens and token types in id order, padded to `n_vocab`, from tokenizer.json."""
    import gguf

    path = model_dir / "tokenizer.json"
    tokenizer = _read_json(path)
    _read_json(model_dir / "tokenizer_config.json")  # required: special tokens and chat template live there
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path} holds a {model.get('type')} tokenizer; only byte-level BPE is supported")
    if model.get("byte_fallback"):
        raise ExportError(
            f"{path} is a SentencePiece-style tokenizer (Llama 2 style, byte_fallback), which GGUF export "
            "does not support yet; only byte-level BPE tokenizers (Qwen2, Llama 3) are"
        )
    pre = _pre_tokenizer_name(tokenizer, path)
    texts: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types = {i: gguf.TokenType.NORMAL for i in texts}
    for added in tokenizer.get("added_tokens", []):
        token_id, content = int(added["id"]), added["content"]
        texts[token_id] = content
        looks_special = content.startswith("<|") and content.endswith("|>")
        special = added.get("special") or looks_special
        types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if not texts:
        raise ExportError(f"{path} has an empty vocabulary")
    if max(texts) >= n_vocab:
        raise ExportError(
            f"{path} has token id {max(texts)} but config.json's vocab_size is {n_vocab}; "
            "the tokenizer does not belong to this model"
        )
    tokens = [texts.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    kinds = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    return _Vocab(tokens, kinds, pre)


def _add_tokenizer(writer: Any, model_dir: Path, vocab: _Vocab, n_vocab: int) -> bool:
    """Write the BPE tokenizer; returns whether a chat template was found."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # SpecialVocab reads merges, bos/eos/pad ids, add_bos/add_eos and the chat template the way
    # llama.cpp's converter does (tokenizer_config.json, then chat_template.jinja / .json).
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError(f"{model_dir / 'tokenizer.json'} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    return bool(special.chat_template)


# ------------------------------------------------------------------------------------ tensors


def _permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split RoPE layout to llama.cpp's interleaved one.

    Within a head, HF rotates row i with row i + d/2; llama.cpp's LLAMA rope rotates rows 2i and
    2i + 1. Rows (n_head * d, ...) → per head, (2, d/2) → (d/2, 2).
    """
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"cannot permute a q/k projection of {rows} rows for {n_head} heads")
    shaped = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weights.shape)


@dataclass(frozen=True)
class _Planned:
    name: str  # GGUF tensor name
    source: _TensorSource | None  # None for generated tensors
    generated: np.ndarray | None
    permute_heads: int  # 0: as it is
    shape: tuple[int, ...]


def _planned_data(item: _Planned, maps: dict[Path, np.memmap]) -> np.ndarray:
    """The tensor's values: read from the checkpoint, or the ones generated for it."""
    if item.source is not None:
        return _load(item.source, maps)
    if item.generated is None:  # _plan gives every tensor a source or generated values
        raise ExportError(f"tensor {item.name} has neither a checkpoint source nor generated values")
    return item.generated


def _plan(
    hp: _HParams, weights: dict[str, _TensorSource], extra: list[tuple[str, np.ndarray]]
) -> list[_Planned]:
    """Map every checkpoint tensor to its GGUF name, in a stable order; refuse the unexpected."""
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[hp.arch]
    name_map = gguf.get_tensor_name_map(arch, hp.n_layer)
    allowed = set(gguf.MODEL_TENSORS[arch])
    planned: list[_Planned] = [_Planned(n, None, t, 0, t.shape) for n, t in extra]
    for hf_name in sorted(weights, key=_natural_key):
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_theta
        if hf_name == "lm_head.weight" and hp.tied:
            continue  # tied: llama.cpp reuses token_embd
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise ExportError(
                f"checkpoint tensor {hf_name!r} has no place in llama.cpp's {hp.arch} architecture; "
                "the checkpoint is not a plain one of that architecture"
            )
        tensor_type, name = found
        heads = 0
        if hp.arch == "llama" and tensor_type == gguf.MODEL_TENSOR.ATTN_Q:
            heads = hp.n_head
        elif hp.arch == "llama" and tensor_type == gguf.MODEL_TENSOR.ATTN_K:
            heads = hp.n_head_kv
        source = weights[hf_name]
        planned.append(_Planned(name, source, None, heads, source.shape))
    names = [p.name for p in planned]
    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in names:
            raise ExportError(f"checkpoint lacks the tensor that becomes {required}")
    if not hp.tied and "output.weight" not in names:
        raise ExportError("checkpoint lacks lm_head.weight and config.json does not set tie_word_embeddings")
    return planned


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort layers numerically (layers.2 before layers.10)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _out_type(quant: str, ndim: int) -> np.dtype[Any] | None:
    """numpy dtype written for a tensor (None: BF16, written as raw uint16)."""
    if ndim == 1 or quant == "F32":
        return np.dtype(np.float32)
    return None if quant == "BF16" else np.dtype(np.float16)


def _convert(data: np.ndarray, quant: str, name: str) -> np.ndarray:
    dtype = _out_type(quant, data.ndim)
    if dtype is None:
        import gguf
        from gguf.quants import quantize

        return quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
    out = np.ascontiguousarray(data, dtype=dtype)
    if dtype == np.float16 and not np.isfinite(out).all():
        raise ExportError(f"tensor {name} overflows float16; export with quant='BF16' or 'F32' instead")
    return out


@dataclass(frozen=True)
class _Written:
    arch: str
    n_tensors: int
    n_params: int
    vocab: _Vocab
    chat_template: bool


def _write_gguf(
    model_dir: Path,
    out: Path,
    quant: str,
    progress: ProgressFactory | None,
    label: str,
) -> _Written:
    """Write `out` with F32/F16/BF16 tensors."""
    import gguf

    config_path = model_dir / "config.json"
    hp = _hparams(_read_json(config_path), config_path)
    weights = _find_weights(model_dir)
    vocab = _read_vocab(model_dir, hp.n_vocab)
    file_type = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    }[quant]

    writer = gguf.GGUFWriter(out, hp.arch)
    try:
        extra = _add_hparams(writer, hp, int(file_type), model_dir.name)
        plan = _plan(hp, weights, extra)
        has_template = _add_tokenizer(writer, model_dir, vocab, hp.n_vocab)
        for item in plan:
            dtype = _out_type(quant, len(item.shape))
            n_elements = int(np.prod(item.shape))
            if dtype is None:
                writer.add_tensor_info(
                    item.name, item.shape, np.dtype(np.uint16), n_elements * 2, gguf.GGMLQuantizationType.BF16
                )
            else:
                writer.add_tensor_info(item.name, item.shape, dtype, n_elements * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        maps: dict[Path, np.memmap] = {}
        with progress_bar(progress, len(plan), label) as bar:
            for item in plan:
                data = _planned_data(item, maps)
                if item.permute_heads:
                    data = _permute_qk(data, item.permute_heads)
                writer.write_tensor_data(_convert(data, quant, item.name))
                bar.update(1)
        maps.clear()
    except BaseException:
        close_quietly(writer)  # the file is removed next; a second error must not hide the first
        raise
    writer.close()
    n_params = sum(int(np.prod(p.shape)) for p in plan)
    return _Written(hp.arch, len(plan), n_params, vocab, has_template)


def _quantize(src: Path, dst: Path, quant: str, threads: int | None) -> None:
    """Run llama.cpp's quantizer from the F16 file `src` to `dst`."""
    import llama_cpp

    from edgespec.runtimes import llama_cpp as runtime

    log = runtime.backend()  # silences llama.cpp's log and keeps the last error line
    log.clear()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _llama_ftype(quant)
    params.nthread = threads or 0
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        free = free_bytes(dst)
        room = f" ({size_text(free)} free in {dst.parent})" if free is not None else ""
        raise ExportError(f"llama.cpp could not quantize to {quant}: {log.reason()}{room}")


# ------------------------------------------------------------------------------------ public


def export_gguf(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    quant: str = "F16",
    progress: ProgressFactory | None = None,
    *,
    threads: int | None = None,
) -> ExportReport:
    """Convert a Hugging Face Llama or Qwen2 checkpoint to one GGUF file, quantized if asked.

    Args:
        model_dir: checkpoint folder with config.json, model.safetensors (or shards with
            model.safetensors.index.json), tokenizer.json and tokenizer_config.json.
        out: GGUF file to write. It is replaced only when the export succeeds; a failed export
            leaves no file behind (temporary files live beside `out` and are removed).
        quant: "F16" (default), "BF16" or "F32", written directly; or a llama.cpp type such as
            "Q8_0" or "Q4_K_M" (see `quant_names()`), made from an F16 file by llama.cpp's quantizer.
            K-quants need matrix rows that are multiples of 256; llama.cpp picks a fallback type for
            tensors whose rows are not.
        progress: optional factory `progress(total, label)` returning a context manager with an
            `update(n)` method; called once for the tensor-writing loop (total = number of tensors,
            one update per tensor) and, when quantizing, once more for that step (total = 1).
        threads: threads for llama.cpp's quantizer (None: all cores).

    Returns:
        An `ExportReport` describing the file.

    Raises:
        ExportError: unsupported architecture, tokenizer or RoPE scaling, a missing or unreadable file,
            an unknown quant, or a failure inside llama.cpp's quantizer; `ExportWriteError` (also an
            OSError) when the output cannot be written, e.g. because the disk is full.
    """
    started = time.perf_counter()
    name = _check_quant(quant)
    model_dir = Path(model_dir)
    out = Path(out)
    if not model_dir.is_dir():
        raise ExportError(f"checkpoint folder not found: {model_dir}")
    if out.is_dir():
        raise ExportError(f"output path {out} is a folder; give a .gguf file name")
    label = f"writing {out.name}"
    with write_errors(out), atomic_path(out, suffix=".gguf") as tmp:
        if name in DIRECT_QUANTS:
            written = _write_gguf(model_dir, tmp, name, progress, label)
        else:
            fd, f16_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".f16.gguf")
            os.close(fd)
            f16 = Path(f16_name)
            try:
                written = _write_gguf(model_dir, f16, "F16", progress, label)
                with progress_bar(progress, 1, f"quantizing to {name}") as bar:
                    _quantize(f16, tmp, name, threads)
                    bar.update(1)
            finally:
                f16.unlink(missing_ok=True)
    return ExportReport(
        path=out,
        architecture=written.arch,
        quant=name,
        n_tensors=written.n_tensors,
        n_params=written.n_params,
        n_vocab=len(written.vocab.tokens),
        tokenizer="gpt2",
        pre_tokenizer=written.vocab.pre,
        chat_template=written.chat_template,
        file_size=out.stat().st_size,
        seconds=time.perf_counter() - started,
    )
