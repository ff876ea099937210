"""The runtime protocol: the whole surface the engine needs from a model backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from edgespec.defaults import N_CTX

if TYPE_CHECKING:
    from edgespec.formats.vocabmap import VocabMap

LogitRows = Literal["last", "all", "none"]


@dataclass(frozen=True)
class RuntimeSettings:
    """How to run one model.

    Attributes:
        n_ctx: context size in tokens (KV cache length).
        n_threads: threads for single-token decoding; None picks the number of physical cores.
        n_threads_batch: threads for batched evaluation (prompt, verification); None = n_threads.
        n_batch: most tokens sent to the backend in one call; longer inputs are split.
        gpu_layers: layers offloaded to a GPU (0 = CPU only, -1 = all).
        flash_attn: "auto", "on" or "off" (default: off, as llama-cpp-python's `Llama`) for
            llama.cpp's kernels; exact kernels always run the flash attention they were probed with.
        kernels: "fast" (default) uses the backend's own default kernels, whose results depend on
            the batch size: speculative output is the target's in distribution (at temperature 0 a
            near-tie may break otherwise after a verification pass). "exact" makes a batched
            forward pass compute every row bit for bit as a single-token pass would (verified on
            the loaded model by `invariance.probe`), so speculative output is identical to
            target-only output under the same kernels.
        verbose: let the backend's own log lines through to stderr.
        n_seq: sequences the context holds (llama.cpp only), each with `n_ctx` cells of its own
            in a KV stream of its own (llama.cpp's `kv_unified` off), so what one sequence holds
            cannot change the attention path of another's rows. Sequence 0 is the one `eval`
            and `truncate` use; `eval_many` and `truncate_seq` reach every sequence.
    """

    n_ctx: int = N_CTX
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int = 512
    gpu_layers: int = 0
    flash_attn: Literal["auto", "on", "off"] = "off"
    kernels: Literal["exact", "fast"] = "fast"
    verbose: bool = False
    n_seq: int = 1


@dataclass(frozen=True)
class VocabInfo:
    """What the engine and the compatibility check need to know about a model's vocabulary.

    Attributes:
        kind: tokenizer family as llama.cpp names it ("spm", "bpe", "wpm", ...).
        n_vocab: number of tokens, which is also the width of a logits row.
        bos, eos, eot: special token ids, or None when the model has none.
        add_bos: whether tokenizing a prompt prepends BOS.
        eog: every token that ends generation (EOS, EOT, <|im_end|>, ...).
    """

    kind: str
    n_vocab: int
    bos: int | None
    eos: int | None
    eot: int | None
    add_bos: bool
    eog: frozenset[int] = field(default_factory=frozenset)


@runtime_checkable
class Runtime(Protocol):
    """One loaded model with one sequence of tokens in its KV cache.

    The cache holds `n_past` tokens at positions 0 … n_past-1. `eval` appends tokens after them;
    `truncate` forgets everything from a position on.

    Every member the engine, the loader and the drafters read is declared here; `RuntimeBase`
    gives the optional ones their defaults (a backend subclasses it and overrides what it has).
    """

    path: Path
    settings: RuntimeSettings
    vocab: VocabInfo
    #: a VocabTrim drafter's map from its ids to its target's (None: ids are the target's)
    vocab_map: VocabMap | None
    #: True when a trimmed model still reads target ids (only its output rows are trimmed)
    inputs_in_target_ids: bool

    @property
    def n_input_vocab(self) -> int:
        """Size of the id space of inputs and of the tokenizer (`vocab.n_vocab` unless a trimmed
        model reads target ids)."""
        ...

    @property
    def tokens(self) -> Sequence[int] | None:
        """The ids in the cache, in position order, so a new prompt can reuse the longest common
        prefix; None when the backend does not track them (every prompt is evaluated whole)."""
        ...

    def chat_template(self) -> str | None:
        """The model's chat template (tokenizer.chat_template), or None when it has none."""
        ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_past(self) -> int: ...

    def eval(self, tokens: Sequence[int], logits: LogitRows = "last") -> np.ndarray:
        """Append `tokens` to the cache and return logits.

        Args:
            tokens: token ids to evaluate at positions n_past … n_past+len-1.
            logits: which rows to return: the last token's, every token's, or none.

        Returns:
            float32 array of shape (rows, n_vocab): rows = 1, len(tokens) or 0. It may be a view of
            backend memory, valid only until the next call to `eval`.
        """
        ...

    def truncate(self, n: int) -> None:
        """Forget every cached token at position >= n."""
        ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token contributes to generated text (empty for control tokens)."""
        ...

    def token_text(self, token: int) -> bytes:
        """The token's raw text as stored in the vocabulary (for compatibility checks)."""
        ...

    def is_special(self, token: int) -> bool:
        """Whether the token was added to the vocabulary whole (a control token such as
        <|im_end|>, or a user-defined one such as Qwen's <tool_call>) rather than learned by the
        tokenizer: grammars treat such tokens apart from text."""
        ...

    def metadata(self, key: str) -> str | None: ...

    @property
    def guarantee(self) -> str:
        """What speculative output over this runtime promises: "exact" (its batched passes are
        row-identical to single-token passes, so the output is token-identical to target-only
        decoding) or "distribution" (rounding depends on the batch size, so the output is the
        target's in distribution and a greedy near-tie may break otherwise)."""
        ...

    def close(self) -> None: ...


class RuntimeBase:
    """Defaults for the optional members of `Runtime`: no vocabulary map, inputs in the model's
    own ids, untracked cache contents and no chat template. Backends subclass it."""

    vocab: VocabInfo
    vocab_map: VocabMap | None = None
    inputs_in_target_ids: bool = False

    @property
    def n_input_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def tokens(self) -> Sequence[int] | None:
        return None

    def chat_template(self) -> str | None:
        return None

    def is_special(self, token: int) -> bool:
        # without token attributes: a token with text in the vocabulary but none in the output
        return not self.token_bytes(token) and bool(self.token_text(token))

    def token_bytes(self, token: int) -> bytes:  # pragma: no cover - every backend defines it
        raise NotImplementedError

    def token_text(self, token: int) -> bytes:  # pragma: no cover - every backend defines it
        raise NotImplementedError
