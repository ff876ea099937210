"""Tiny random-weight llama GGUF models for tests.

The runtime under test drives real llama.cpp models through llama-cpp-python,
but real models are far too big for a test suite.  These helpers write
complete, loadable llama-architecture GGUF files of about a megabyte in a few
milliseconds, so tests can exercise loading, tokenization, chat
templates, end-of-generation handling and target/draft agreement for real.

Design choices that matter to tests:

* Every model built on the same :class:`TinyVocab` tokenizes text identically,
  so a target and a draft built here are tokenizer-compatible by construction.
* Part of the weights comes from a seed shared by all models
  (``shared_seed``): a low-rank "bigram" preference in the token embedding and
  output projection, plus one attention head in the first layer that attends
  uniformly to the whole context and lowers the logits of tokens resembling
  what has already been said (a crude, built-in repetition penalty).  Two
  models with different ``seed`` therefore agree on about two thirds of their
  greedy next tokens instead of one in ``vocab.size``, which is what
  speculative decoding needs to show both accepted and rejected draft tokens,
  and greedy output does not fall into the short loops that random weights
  otherwise produce.
* Output rows of non-NORMAL tokens (control, byte, padding) are damped by
  ``special_logit_scale`` so greedy text is made of ordinary word pieces and
  does not stop at a random ``</s>`` or spell out raw bytes.  Greedy
  generation therefore never ends on its own; a test that needs an
  end-of-generation token should force it (e.g. with a logit bias).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML-like template: the markers are the vocabulary's own control tokens."""

WORD_BOUNDARY = "\u2581"
"""SentencePiece's "▁": marks a piece that starts a new word (stands for a space)."""

_SHARED_RANK = 16
"""Width of the shared subspace; must fit in one attention head (head_dim >= 16)."""

_OWN_SCALE = 0.25
"""Size of the model-specific embedding/output columns relative to the shared ones."""

_ECHO = 4.0
"""Weight of the (rotated) token embedding inside the shared output rows."""

_MEMORY_STRENGTH = 20.0
"""How strongly the first layer's context-average head penalises earlier tokens."""

_WORD_TEXT = (
    "the a and of to in is it that was for on are with as be at this have from "
    "or by not but what all were when we there can an your which their said if "
    "do will each about how up out them then she many some so these would other "
    "into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long "
    "little very after word called just where most know hello world cat dog you "
    "he i one had his they get go good yes"
)
_SUFFIXES = ("ing", "ed", "er", "es", "ly", "s", "th", "he", "in", "an", "re", "on", "at", "en", "nd")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"


@dataclasses.dataclass(frozen=True)
class TinyVocab:
    """A SentencePiece-style vocabulary as llama.cpp reads it from GGUF metadata.

    ``tokens[i]``, ``scores[i]`` and ``types[i]`` describe token id ``i``;
    higher scores merge first during tokenization.
    """

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[TokenType, ...]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    eot_id: int = 3
    im_start_id: int = 4

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.scores) == len(self.types):
            raise ValueError("tokens, scores and types must have the same length")

    @property
    def size(self) -> int:
        """Number of tokens, padding included (the model's ``n_vocab``)."""
        return len(self.tokens)

    def id_of(self, text: str) -> int:
        """Return the id of the token whose text is exactly ``text``."""
        return self.tokens.index(text)


def _normal_pieces() -> list[str]:
    """Word pieces in priority order, each reachable by pairwise merges.

    llama.cpp's SentencePiece tokenizer only merges two adjacent symbols when
    their concatenation is itself a token, so every word comes with all its
    prefixes ("▁h", "▁he", "▁hel", ...); otherwise the word could never form.
    """
    pieces: dict[str, None] = {WORD_BOUNDARY: None}
    for word in _WORD_TEXT.split():
        full = WORD_BOUNDARY + word
        for end in range(2, len(full) + 1):
            pieces.setdefault(full[:end])
    for suffix in _SUFFIXES:
        for end in range(2, len(suffix) + 1):
            pieces.setdefault(suffix[:end])
    for char in _CHARS:
        pieces.setdefault(char)
    return list(pieces)


def default_vocab() -> TinyVocab:
    """The shared test vocabulary: 5 control tokens, 256 bytes, ~300 pieces.

    Ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<|im_end|>`` (eot),
    4 ``<|im_start|>``, 5..260 ``<0x00>``..``<0xFF>``, then NORMAL pieces with
    strictly decreasing scores.  Anything not covered by a piece (capitals,
    newlines, non-ASCII) falls back to byte tokens, as in real llama vocabularies.
    """
    tokens = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
    types = [TokenType.UNKNOWN] + [TokenType.CONTROL] * 4
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    pieces = _normal_pieces()
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores += [-float(rank) for rank in range(len(pieces))]
    return TinyVocab(tuple(tokens), tuple(scores), tuple(types))


def vocab_with_changed_token(vocab: TinyVocab, index: int, new_text: str) -> TinyVocab:
    """Copy ``vocab`` with token ``index`` renamed to ``new_text``.

    Used to build a model that is compatible in every respect except one
    token's text, so a compatibility check can be asked to name that token.
    """
    if new_text in vocab.tokens:
        raise ValueError(f"token text {new_text!r} already exists in the vocabulary")
    tokens = list(vocab.tokens)
    tokens[index] = new_text
    return dataclasses.replace(vocab, tokens=tuple(tokens))


def vocab_with_padding(vocab: TinyVocab, count: int) -> TinyVocab:
    """Copy ``vocab`` with ``count`` UNUSED padding tokens appended.

    Mirrors real model families whose larger members pad the embedding matrix
    to a round size: the vocabularies then differ only in trailing padding.
    """
    extra = [f"<|pad_{n}|>" for n in range(count)]
    return dataclasses.replace(
        vocab,
        tokens=vocab.tokens + tuple(extra),
        scores=vocab.scores + (0.0,) * count,
        types=vocab.types + (TokenType.UNUSED,) * count,
    )


def _linear(rng: np.random.Generator, n_out: int, n_in: int, scale: float) -> np.ndarray:
    """A (out, in) weight with std ``scale / sqrt(n_in)`` (variance-preserving at 1)."""
    return rng.standard_normal((n_out, n_in)) * (scale / np.sqrt(n_in))


def _vocab_matrices(
    seed: int,
    vocab: TinyVocab,
    n_embd: int,
    rank: int,
    shared_seed: int | None,
    special_logit_scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the token embedding, the output projection and a shared rotation.

    Both matrices are (n_vocab, n_embd).  Their first ``rank`` columns come
    from ``shared_seed``: the embedding holds a shared code ``u`` per token, the
    output holds a shared bigram table ``w`` plus ``_ECHO`` times the token's
    own code turned by the rotation, which lets the first layer's memory head
    (see :func:`_add_memory_head`) penalise tokens by their similarity to the
    context.  Each matrix has its own generator and rows are drawn in order, so
    padding the vocabulary only appends rows: a padded model gives the same
    logits as the unpadded one on the shared ids.
    """
    n_vocab = vocab.size
    embd = np.random.default_rng([seed, 0]).standard_normal((n_vocab, n_embd)) * _OWN_SCALE
    out = np.random.default_rng([seed, 1]).standard_normal((n_vocab, n_embd)) * _OWN_SCALE
    rotation = np.eye(rank)
    if shared_seed is not None and rank:
        code = np.random.default_rng([shared_seed, 0]).standard_normal((n_vocab, _SHARED_RANK))[:, :rank]
        bigram = np.random.default_rng([shared_seed, 1]).standard_normal((n_vocab, _SHARED_RANK))[:, :rank]
        rotation, _ = np.linalg.qr(
            np.random.default_rng([shared_seed, 2, rank]).standard_normal((rank, rank))
        )
        embd[:, :rank] = code
        out[:, :rank] = bigram + _ECHO * code @ rotation.T
    out *= 3.0 / np.sqrt(n_embd)  # logits of a normalised state get a spread of a few units
    special = np.array([kind != TokenType.NORMAL for kind in vocab.types])
    out[special] *= special_logit_scale
    return embd, out, rotation


def _add_memory_head(
    q: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    *,
    rank: int,
    head_dim: int,
    n_embd: int,
    rotation: np.ndarray,
) -> None:
    """Turn attention head 0 of a layer into a shared context-average head, in place.

    Zero queries make every attention score equal, so the head averages its
    values over all earlier positions whatever RoPE does.  Its values copy the
    shared code (rescaled to undo the RMS norm, so models of different width
    see the same numbers) and its output writes minus the rotated average
    back into the shared subspace.  Against the ``_ECHO`` term of the output
    rows, that lowers each token's logit by its similarity to the context.
    """
    rms_fix = np.sqrt((rank + _OWN_SCALE**2 * (n_embd - rank)) / n_embd)
    q[:head_dim] = 0.0
    v[:head_dim] = 0.0
    v[:rank, :rank] = rms_fix * np.eye(rank)
    o[:, :head_dim] = 0.0
    o[:rank, :rank] = -_MEMORY_STRENGTH * rotation


def _add_tokenizer(writer: GGUFWriter, vocab: TinyVocab, chat_template: str | None) -> None:
    """Write the SentencePiece ("llama") tokenizer metadata llama.cpp expects."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types([int(kind) for kind in vocab.types])
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    # Without an explicit eot id llama.cpp would still guess "<|im_end|>" from
    # its text, but stating it keeps end-of-turn independent of such heuristics.
    writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def build_tiny_model(
    path: str | Path,
    *,
    seed: int,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    vocab: TinyVocab | None = None,
    weight_scale: float = 0.6,
    chat_template: str | None = DEFAULT_TEMPLATE,
    name: str = "tiny",
    shared_seed: int | None = 0,
    special_logit_scale: float = 0.3,
    quantized: bool = True,
) -> Path:
    """Write a random-weight llama-architecture GGUF to ``path``.

    With ``quantized`` (the default) every 2-D matrix except the token
    embedding is stored as Q8_0, like the quantized GGUFs people run: llama.cpp's
    CPU kernels for quantized weights compute each output row the same way
    whatever the batch size, while its F32 kernels do not (they differ in the
    last bits), and the engine's exactness tests rely on the former.

    Block weights come from ``default_rng(seed)``, the model-specific parts of
    the embedding and output from ``default_rng([seed, 0|1])``, the shared parts
    from ``shared_seed`` (see the module docstring).

    ``weight_scale`` multiplies the variance-preserving std
    (``1/sqrt(fan_in)``) of every block matrix, i.e. how far the model-specific
    blocks pull the prediction away from the shared structure.  Measured on
    the target of :func:`build_pair` against its draft, teacher-forced on the
    target's greedy output: 0.3 agrees on ~88% of next tokens, the default 0.6
    on ~65% (51-74% across seed pairs), 0.8 on ~40%, 1.0 on ~20%.  At every
    scale greedy output keeps changing for hundreds of tokens.
    ``shared_seed=None`` gives fully independent models, which agree on almost
    nothing and loop after a few dozen greedy tokens.  The shared part needs
    ``n_embd // n_head >= 16``; narrower heads share less.
    ``special_logit_scale`` multiplies the output rows of control, byte and
    padding tokens (1.0: no damping).  Returns ``path`` as a Path.
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    if vocab is None:
        vocab = default_vocab()
    path = Path(path)
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if quantized else LlamaFileType.ALL_F32)
    writer.add_vocab_size(vocab.size)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    _add_tokenizer(writer, vocab, chat_template)

    # gguf reverses numpy's dimension order, so (out, in) arrays become the
    # {in, out} tensors llama.cpp multiplies activations by.
    rank = min(_SHARED_RANK, head_dim) if shared_seed is not None else 0
    embd, out, rotation = _vocab_matrices(seed, vocab, n_embd, rank, shared_seed, special_logit_scale)
    ones = np.ones(n_embd)
    tensors: list[tuple[str, np.ndarray]] = [
        ("token_embd", embd),
        ("output_norm", ones),
        ("output", out),
    ]
    for block in range(n_layer):
        q = _linear(rng, n_embd, n_embd, weight_scale)
        k = _linear(rng, n_embd_kv, n_embd, weight_scale)
        v = _linear(rng, n_embd_kv, n_embd, weight_scale)
        o = _linear(rng, n_embd, n_embd, weight_scale)
        if block == 0 and rank:
            _add_memory_head(q, v, o, rank=rank, head_dim=head_dim, n_embd=n_embd, rotation=rotation)
        tensors += [
            (f"blk.{block}.{suffix}", tensor)
            for suffix, tensor in (
                ("attn_norm", ones),
                ("attn_q", q),
                ("attn_k", k),
                ("attn_v", v),
                ("attn_output", o),
                ("ffn_norm", ones),
                ("ffn_gate", _linear(rng, n_ff, n_embd, weight_scale)),
                ("ffn_up", _linear(rng, n_ff, n_embd, weight_scale)),
                ("ffn_down", _linear(rng, n_embd, n_ff, weight_scale)),
            )
        ]
    for tensor_name, tensor in tensors:
        data = tensor.astype(np.float32)
        if quantized and data.ndim == 2 and tensor_name != "token_embd":
            q8 = quantize(data, GGMLQuantizationType.Q8_0)
            writer.add_tensor(f"{tensor_name}.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{tensor_name}.weight", data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_pair(directory: str | Path) -> tuple[Path, Path]:
    """Build a (target, draft) pair sharing :func:`default_vocab` in ``directory``.

    The target (seed 1, 96 wide, 3 layers) is larger than the draft (seed 2,
    64 wide, 2 layers), as in a real speculative-decoding setup.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = default_vocab()
    target = build_tiny_model(
        directory / "target.gguf", seed=1, n_embd=96, n_layer=3, n_ff=192, vocab=vocab, name="tiny-target"
    )
    draft = build_tiny_model(directory / "draft.gguf", seed=2, vocab=vocab, name="tiny-draft")
    return target, draft
