"""A runtime over ONNX Runtime, for decoder models exported by `edgespec.exporters.onnx`.

The model is optimum's "text-generation-with-past" decoder: inputs `input_ids`, `attention_mask`,
`position_ids` and `past_key_values.{i}.key/value`; outputs `logits` and `present.{i}.key/value`.
The names and the cache layout (batch, kv_heads, seq, head_dim) are read from the graph, not
assumed. The cache lives between calls as the `present` arrays ONNX Runtime returned (no copy):
they are fed back as the next call's `past`, and rolling back is a slice along the sequence axis
(one copy, only when something is actually dropped).

Ids. Token ids are the tokenizer's ids throughout (`tokenize`, `token_text`, `token_bytes`, the
special ids in `vocab`), with one exception: a VocabTrim export (`vocab_map` is set) keeps its full
input embedding, so it reads the target's ids unchanged (`inputs_in_target_ids`), while its logits
rows have only N columns, column j being target id `vocab_map.keep[j]`; `vocab.n_vocab` is then
N, the width of a logits row, and `n_input_vocab` the size of the tokenizer's id space.

Exact kernels. ONNX Runtime's CPU kernels do not compute a row of a many-row pass bit for bit as
a one-token pass (measured: rows ~1e-6 apart on the tiny test models, float32), so with
`kernels="exact"` a call that asks for every row's logits is evaluated one token at a time: k
single-token passes instead of one batched pass, about k times the cost of decoding one token
instead of roughly one pass's cost. "last" and "none" (prompt processing) stay batched.
`kernels="fast"` batches everything; a drafter should use it (its rounding cannot change output).

Vocabulary. Special ids and token kinds come from `edgespec_onnx.json`, written by the exporter
(exactly llama.cpp's view of the vocabulary when the export came from a GGUF); for other optimum
exports they are derived from the tokenizer files with llama.cpp's rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgespec.errors import ModelLoadError, PromptTooLongError, SettingsError, encode_utf8
from edgespec.formats.vocabmap import SIDECAR_NAME, VocabMap
from edgespec.runtimes.base import LogitRows, RuntimeBase, RuntimeSettings, VocabInfo

EXPORT_INFO_NAME = "edgespec_onnx.json"
MODEL_NAME = "model.onnx"

# Execution providers in order of preference, and the short names a user may give.
PROVIDER_ORDER = (
    "CUDAExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)
PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

# llama.cpp's rules (llama-vocab.cpp) for tokens that end generation, by their text.
EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
EOG_TEXTS = frozenset(
    EOT_TEXTS
    + (
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "</s>",
        "<|eom_id|>",
        "[EOS]",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "[e~[",
    )
)
FIM_EOG_TEXTS = (
    ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("<|file_sep|>",),
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: vocabulary character → byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def vocab_from_tokenizer(directory: Path) -> dict[str, Any]:
    """Special ids and token kinds of a tokenizer folder, by llama.cpp's rules.

    Args:
        directory: holds tokenizer.json and usually tokenizer_config.json (and config.json).

    Returns:
        The "vocab" entry of edgespec_onnx.json: kind, bos, eos, eot, add_bos, eog, control,
        user_defined, unused (ids in the tokenizer's id space).
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = _read_json(directory / "tokenizer_config.json")
    model_config = _read_json(directory / "config.json")
    spec = json.loads(tokenizer.to_str())
    control = sorted(a["id"] for a in spec.get("added_tokens", []) if a.get("special"))
    user_defined = sorted(a["id"] for a in spec.get("added_tokens", []) if not a.get("special"))

    def token_id(entry: Any, fallback_key: str) -> int | None:
        if isinstance(entry, dict):
            entry = entry.get("content")
        if isinstance(entry, str):
            found = tokenizer.token_to_id(entry)
            if found is not None:
                return found
        value = model_config.get(fallback_key)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) else None

    bos = token_id(config.get("bos_token"), "bos_token_id")
    eos = token_id(config.get("eos_token"), "eos_token_id")
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:
        # What the post-processor does: does encoding with special tokens prepend BOS?
        with_special = tokenizer.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and len(with_special) > 1 and with_special[0] == bos
    texts = {text: i for text, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    eot = next((texts[t] for t in EOT_TEXTS if t in texts), None)
    eog = {i for t, i in texts.items() if t in EOG_TEXTS}
    for names in FIM_EOG_TEXTS:
        found = next((texts[t] for t in names if t in texts), None)
        if found is not None:
            eog.add(found)
    eog.update(i for i in (eos, eot) if i is not None)
    return {
        "kind": "bpe",
        "bos": bos,
        "eos": eos,
        "eot": eot,
        "add_bos": add_bos,
        "eog": sorted(eog),
        "control": control,
        "user_defined": user_defined,
        "unused": [],
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers in this installation."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_provider(requested: str | None, available: Sequence[str]) -> str:
    """The execution provider to use.

    Args:
        requested: a provider name ("CUDAExecutionProvider") or short name ("cuda", "dml",
            "coreml", "cpu"); None picks the first available of CUDA, DirectML, CoreML, CPU.
        available: what `onnxruntime.get_available_providers()` lists.

    Returns:
        The full provider name.
    """
    if requested is None:
        for name in PROVIDER_ORDER:
            if name in available:
                return name
        raise ModelLoadError(f"no usable ONNX Runtime execution provider (available: {', '.join(available)})")
    name = PROVIDER_ALIASES.get(requested.lower(), requested)
    if name not in available:
        raise SettingsError(
            f"ONNX Runtime execution provider {requested!r} is not available here; available: "
            f"{', '.join(available)}"
        )
    return name


class OnnxRuntime(RuntimeBase):
    """One exported decoder and one KV cache holding one sequence.

    Args:
        path: the export folder (model.onnx, tokenizer.json, optional vocab_map.json and
            edgespec_onnx.json), or the model.onnx file in it.
        settings: context size, threads (intra-op threads), batch size, kernels.
        provider: execution provider name or short name; None picks CUDA, DirectML, CoreML, then CPU.

    Attributes:
        provider: the execution provider in use.
        vocab_map: the VocabTrim map when the export's LM head was trimmed, else None.
        inputs_in_target_ids: True when the model reads target ids unchanged (always, for an
            ONNX export: only its outputs are trimmed).
        n_input_vocab: size of the id space of inputs and of the tokenizer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: RuntimeSettings | None = None,
        provider: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings or RuntimeSettings()
        if self.settings.n_ctx < 8:
            raise SettingsError(f"context size must be at least 8 tokens, got {self.settings.n_ctx}")
        if self.settings.n_batch < 1:
            raise SettingsError(f"batch size must be at least 1, got {self.settings.n_batch}")
        directory = self.path.parent if self.path.suffix == ".onnx" else self.path
        model_file = self.path if self.path.suffix == ".onnx" else directory / MODEL_NAME
        if not directory.is_dir():
            raise ModelLoadError(f"ONNX model folder not found: {directory}")
        if not model_file.is_file():
            raise ModelLoadError(
                f"{directory} holds no {MODEL_NAME}; export one with edgespec's ONNX exporter"
            )
        if not (directory / "tokenizer.json").is_file():
            raise ModelLoadError(f"{directory} holds no tokenizer.json beside {model_file.name}")
        self.directory = directory
        self._session: Any = None

        import onnxruntime as ort

        self.provider = choose_provider(provider, available_providers())
        options = ort.SessionOptions()
        from edgespec.runtimes.llama_cpp import default_threads

        options.intra_op_num_threads = self.settings.n_threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 0 if self.settings.verbose else 3
        providers = (
            [self.provider]
            if self.provider == "CPUExecutionProvider"
            else [self.provider, "CPUExecutionProvider"]
        )
        try:
            self._session = ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"ONNX Runtime could not load {model_file}: {exc}") from exc
        self._read_io()

        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._info = _read_json(directory / EXPORT_INFO_NAME)
        self._config = _read_json(directory / "config.json")
        self._tokenizer_config = _read_json(directory / "tokenizer_config.json")
        sidecar = directory / SIDECAR_NAME
        self.vocab_map: VocabMap | None = VocabMap.from_json_file(sidecar) if sidecar.is_file() else None
        self.inputs_in_target_ids = self._info.get("input_ids", "target") == "target"
        if self.vocab_map is not None and self.vocab_map.n_keep != self._n_out:
            raise ModelLoadError(
                f"{sidecar} keeps {self.vocab_map.n_keep} tokens but {model_file.name} outputs "
                f"{self._n_out} logits"
            )
        self._n_input_vocab = int(self._config.get("vocab_size") or self._tokenizer.get_vocab_size(True))
        self._n_tokenizer = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._vocab_spec = self._info.get("vocab") or vocab_from_tokenizer(directory)
        self._control = frozenset(self._vocab_spec.get("control", ()))
        self._user_defined = frozenset(self._vocab_spec.get("user_defined", ()))
        self._unused = frozenset(self._vocab_spec.get("unused", ()))
        self.vocab = self._read_vocab()
        self._bytes_of = _byte_decoder()
        self._pieces: dict[int, bytes] = {}
        self._n_ctx = self.settings.n_ctx
        self._exact = self.settings.kernels == "exact"
        #: "exact" (one token per pass whenever every row's logits are needed) or "distribution"
        self.guarantee = "exact" if self._exact else "distribution"
        self._past: list[np.ndarray] = []
        self._n_past = 0
        self.truncate(0)

    # ------------------------------------------------------------------------------------- io

    def _read_io(self) -> None:
        session = self._session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise ModelLoadError(
                f"{self.path} is not a decoder export (inputs {sorted(inputs)}, outputs {sorted(outputs)})"
            )
        self._past_names = sorted(
            (n for n in inputs if n.startswith("past_key_values.")), key=lambda n: _layer_key(n)
        )
        self._present_names = ["present." + n[len("past_key_values.") :] for n in self._past_names]
        missing = [n for n in self._present_names if n not in outputs]
        if not self._past_names or missing:
            raise ModelLoadError(
                f"{self.path} has no key/value cache inputs and outputs; export it with past key/values "
                "(task text-generation-with-past)"
            )
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        self._cache_shapes = []
        for name in self._past_names:
            shape = inputs[name].shape  # [batch, kv_heads, past_len, head_dim]
            if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise ModelLoadError(f"{self.path}: unexpected shape {shape} of cache input {name}")
            self._cache_shapes.append((shape[1], shape[3]))
        self._cache_dtype = np.float16 if "float16" in inputs[self._past_names[0]].type else np.float32
        width = outputs["logits"].shape[-1]
        if not isinstance(width, int):
            raise ModelLoadError(f"{self.path}: the logits output has no fixed width ({width})")
        self._n_out = width
        self._output_names = ["logits", *self._present_names]

    # ---------------------------------------------------------------------------------- vocab

    def _read_vocab(self) -> VocabInfo:
        spec = self._vocab_spec

        def special(key: str) -> int | None:
            value = spec.get(key)
            return value if isinstance(value, int) and 0 <= value < self._n_input_vocab else None

        return VocabInfo(
            kind=str(spec.get("kind", "bpe")),
            n_vocab=self._n_out,
            bos=special("bos"),
            eos=special("eos"),
            eot=special("eot"),
            add_bos=bool(spec.get("add_bos", False)),
            eog=frozenset(int(t) for t in spec.get("eog", ())),
        )

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text.
            add_special: prepend BOS when the model asks for it (`vocab.add_bos`).
            parse_special: read control-token texts such as "<|im_start|>" as those tokens; when
                False they are split as plain text (user-defined tokens are always matched, as in
                llama.cpp).

        Returns:
            The ids, in the tokenizer's (the target's) id space.
        """
        encode_utf8(text, "the text")  # the llama.cpp runtime's rule: text without a UTF-8 form is refused
        tokenizer = self._tokenizer
        tokenizer.encode_special_tokens = not parse_special
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self.vocab.add_bos and self.vocab.bos is not None:
            ids.insert(0, self.vocab.bos)
        return ids

    def token_text(self, token: int) -> bytes:
        """The token's vocabulary string as llama.cpp stores it (byte-level form, e.g. "Ġthe")."""
        text = self._tokenizer.id_to_token(token) if 0 <= token < self._n_tokenizer else None
        if text is None:
            # Padding rows beyond the tokenizer, named as llama.cpp's converter names them.
            return f"[PAD{token}]".encode() if 0 <= token < self._n_input_vocab else b""
        return text.encode("utf-8")

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            if token in self._control or token in self._unused or not 0 <= token < self._n_tokenizer:
                piece = b""
            elif token in self._user_defined:
                piece = self.token_text(token)
            else:
                text = self.token_text(token).decode("utf-8")
                decoder = self._bytes_of
                try:
                    piece = bytes(decoder[c] for c in text)
                except KeyError:  # not byte-level: take the text as it is
                    piece = text.encode("utf-8")
            self._pieces[token] = piece
        return piece

    def metadata(self, key: str) -> str | None:
        """A GGUF-style metadata value where one maps (general.architecture, tokenizer.chat_template,
        <arch>.context_length), or an entry of edgespec_onnx.json / config.json by its own name."""
        arch = str(self._config.get("model_type", ""))
        known: dict[str, Any] = {
            "general.architecture": arch or None,
            "general.name": self._info.get("source"),
            "tokenizer.chat_template": self.chat_template(),
            f"{arch}.context_length": self._config.get("max_position_embeddings"),
        }
        value = known.get(key)
        if value is None:
            value = self._info.get(key, self._config.get(key))
        if value is None or isinstance(value, (dict, list)):
            return None
        return str(value)

    @property
    def n_input_vocab(self) -> int:
        return self._n_input_vocab

    def chat_template(self) -> str | None:
        template = self._tokenizer_config.get("chat_template")
        if isinstance(template, str):
            return template
        jinja = self.directory / "chat_template.jinja"
        return jinja.read_text(encoding="utf-8") if jinja.is_file() else None

    # ---------------------------------------------------------------------------------- state

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_past(self) -> int:
        return self._n_past

    def eval(self, tokens: Sequence[int], logits: LogitRows = "last") -> np.ndarray:
        """Append `tokens` to the cache and return logits rows.

        Args:
            tokens: ids at positions n_past … n_past+len-1 (target ids, also for a trimmed export).
            logits: "last", "all" or "none".

        Returns:
            float32 array (rows, vocab.n_vocab); columns are vocab_map.keep when trimmed.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("eval needs at least one token")
        if self._n_past + n > self._n_ctx:
            raise PromptTooLongError(
                f"{self._n_past + n} tokens do not fit the context of {self._n_ctx} tokens"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self._n_input_vocab:
            bad = int(ids[(ids < 0) | (ids >= self._n_input_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of {self._n_input_vocab} tokens")
        if logits == "all":
            # Exact kernels: a batched MatMul rounds differently from a one-row one, so one token per pass.
            step = 1 if self._exact else self.settings.n_batch
            rows = [self._run(ids[i : i + step], all_rows=True) for i in range(0, n, step)]
            return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
        # Every pass computes logits for all its rows; smaller pieces bound that table's size.
        step = min(self.settings.n_batch, 64)
        out = np.empty((0, self._n_out), dtype=np.float32)
        for i in range(0, n, step):
            out = self._run(ids[i : i + step], all_rows=False)
        return out if logits == "last" else out[:0]

    def _run(self, ids: np.ndarray, *, all_rows: bool) -> np.ndarray:
        n = len(ids)
        start = self._n_past
        feed: dict[str, np.ndarray] = {"input_ids": ids[None, :]}
        if self._has_mask:
            feed["attention_mask"] = np.ones((1, start + n), dtype=np.int64)
        if self._has_positions:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        feed.update(zip(self._past_names, self._past, strict=True))
        results = self._session.run(self._output_names, feed)
        self._past = results[1:]
        self._n_past = start + n
        row_logits = results[0][0]
        return row_logits if all_rows else row_logits[-1:]

    def truncate(self, n: int) -> None:
        """Forget every cached token at position >= n (a slice of each cache array)."""
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        if self._past and n >= self._n_past:
            return
        if n == 0 or not self._past:
            self._past = [
                np.zeros((1, heads, 0, dim), dtype=self._cache_dtype) for heads, dim in self._cache_shapes
            ]
        else:
            self._past = [np.ascontiguousarray(a[:, :, :n]) for a in self._past]
        self._n_past = n

    def close(self) -> None:
        self._session = None
        self._past = []

    def __enter__(self) -> OnnxRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _layer_key(name: str) -> tuple[int, str]:
    # past_key_values.{layer}.{key|value}
    parts = name.split(".")
    return (int(parts[1]) if parts[1].isdigit() else 0, parts[-1])
