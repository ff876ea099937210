"""Constrained decoding: JSON Schema, regular expressions and context-free grammars.

The constraint engine is llguidance (see BENCHMARKS.md for how it was chosen over xgrammar). A
`Grammar` is the user's description, checked before generation starts; a `Constraint` is its
matcher for one generation, kept in step with the accepted tokens. The engine uses it in three
places, all through the one logits pipeline (`sampling.LogitsProcessor`):

- every target row is masked to the tokens the grammar allows after the tokens before it, and so
  is every row a model drafter samples from, so p and q are constrained alike;
- the tokens the grammar forces next are proposed as drafts at no cost;
- drafts from any source are cut at the first token the grammar forbids.

llguidance is imported only here, and only when a grammar is used.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgespec.errors import RuntimeFailure, SettingsError

if TYPE_CHECKING:
    from edgespec.runtimes.base import Runtime

GrammarKind = Literal["json_schema", "regex", "lark", "gbnf"]

_LABELS = {
    "json_schema": "JSON schema",
    "regex": "regular expression",
    "lark": "grammar",
    "gbnf": "grammar",
}


@dataclass(frozen=True)
class Grammar:
    """What the output must match, before it is compiled for a vocabulary.

    Build one with `json_schema`, `json_object`, `regex`, `lark` or `gbnf`; each checks its input
    and raises a one-line `SettingsError` naming what is wrong.

    Attributes:
        kind: "json_schema", "regex", "lark" (llguidance's Lark syntax) or "gbnf" (llama.cpp's).
        source: the schema as JSON text, the regular expression or the grammar text.
    """

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool) -> Grammar:
        """Output that is JSON valid against `schema` (an object, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise SettingsError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, Mapping):
            raise SettingsError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SettingsError(f"the JSON schema cannot be written as JSON: {e}") from None
        return cls._checked("json_schema", text)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Output matching the regular expression `pattern` whole (Rust `regex` syntax)."""
        return cls._checked("regex", _text(pattern, "regular expression"))

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        """Output derived from a context-free grammar in llguidance's Lark syntax."""
        return cls._checked("lark", _text(grammar, "grammar"))

    @classmethod
    def gbnf(cls, grammar: str) -> Grammar:
        """Output derived from a context-free grammar in llama.cpp's GBNF syntax."""
        return cls._checked("gbnf", _text(grammar, "grammar"))

    @classmethod
    def from_text(cls, text: str) -> Grammar:
        """A grammar file's text: GBNF when it defines `root ::=`, else Lark."""
        text = _text(text, "grammar")
        return cls.gbnf(text) if "::=" in text else cls.lark(text)

    @classmethod
    def _checked(cls, kind: GrammarKind, source: str) -> Grammar:
        grammar = cls(kind, source)
        grammar.compiled()
        return grammar

    @property
    def label(self) -> str:
        return _LABELS[self.kind]

    def compiled(self) -> str:
        """llguidance's grammar definition for this grammar (checked, cached per source)."""
        return _compiled(self.kind, self.source)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"the {what} must be non-empty text, got {value!r}")
    return value


#: JSON as Python's json.dumps writes it; a schema's own "x-guidance" options override this
JSON_STYLE: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=64)  # a bad grammar raises, and is not kept
def _compiled(kind: GrammarKind, source: str) -> str:
    """The grammar in llguidance's own form, checked."""
    import llguidance

    label = _LABELS[kind]
    try:
        if kind == "json_schema":
            # One line, no free whitespace: every separator and brace is then forced, and
            # forced tokens are free drafts.
            text = llguidance.LLMatcher.grammar_from_json_schema(source, defaults=JSON_STYLE)
        elif kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(source)
        elif kind == "gbnf":
            text = llguidance.grammar_from("gbnf", source)
        else:
            text = llguidance.LLMatcher.grammar_from_lark(source)
    except ValueError as e:
        raise SettingsError(f"the {label} is not valid: {_first_line(str(e))}") from None
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise SettingsError(f"the {label} is not valid: {_first_line(error)}")
    return text


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no detail)"
    # a regex error's own reason ("error: unclosed group") comes on a later line
    reason = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0].rstrip(':')}: {reason[6:].strip()}" if reason else lines[0]


#: a user-defined token written like a control token: <tool_call>, [TOOL_CALLS]
_LOOKS_SPECIAL = re.compile(rb"<[^<>\s]+>|\[[A-Z_]+\]")


def grammar_special(runtime: Runtime, token: int, piece: bytes | None = None) -> bool:
    """Whether grammars treat `token` apart from text: a control token (no text in the output),
    or a user-defined one written like one (Qwen's <tool_call>). Text never spells such a token;
    a grammar names it by id (`<[id]>` in Lark)."""
    piece = runtime.token_bytes(token) if piece is None else piece
    return (
        (not piece or _LOOKS_SPECIAL.fullmatch(piece) is not None)
        and runtime.is_special(token)
        and bool(runtime.token_text(token))
    )


class _VocabTokens:
    """A runtime's vocabulary as llguidance's TokenizerWrapper reads it: every token's bytes
    (control tokens marked with a leading 0xFF, as llguidance expects) and a tokenize function."""

    def __init__(self, runtime: Runtime) -> None:
        vocab = runtime.vocab
        self.eos_token_id = vocab.eos if vocab.eos is not None else min(vocab.eog, default=0)
        self.bos_token_id = vocab.bos
        tokens: list[bytes] = []
        special: list[int] = []
        for token in range(vocab.n_vocab):
            piece = runtime.token_bytes(token)
            if grammar_special(runtime, token, piece):
                piece = b"\xff" + runtime.token_text(token)
                special.append(token)
            tokens.append(piece)
        self.tokens = tokens
        self.special_token_ids = special
        # weak: the tokenizer is cached per runtime and must not keep it alive
        self._runtime = weakref.ref(runtime)

    def __call__(self, text: str) -> list[int]:
        """The runtime's tokens for a piece of text in the middle of the output: without the
        space a SentencePiece vocabulary puts before a text's start (llama.cpp adds it)."""
        if not isinstance(text, str):  # llguidance probes with bytes; it then sends str
            raise TypeError("text only")
        runtime = self._runtime()
        if runtime is None:
            raise RuntimeFailure("the model was closed")
        tokenize = runtime.tokenize
        tokens = tokenize(_MARK + text, add_special=False, parse_special=False)
        # Drop the tokens that spell the marker (and a space before it), when they stand alone.
        spelled = b""
        for i, token in enumerate(tokens):
            spelled += self.tokens[token] if 0 <= token < len(self.tokens) else b"?"
            if spelled.lstrip(b" ") == _MARK.encode():
                return tokens[i + 1 :]
            if len(spelled) > len(_MARK) + 1:
                break
        # The marker merged with the text: tokenize it alone and drop a leading lone space.
        tokens = tokenize(text, add_special=False, parse_special=False)
        if tokens and not text.startswith(" ") and self.tokens[tokens[0]] == b" ":
            tokens = tokens[1:]
        return tokens


#: a character that starts a text without merging with what follows it in common vocabularies
_MARK = "\n"


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def tokenizer_for(runtime: Runtime) -> Any:
    """llguidance's tokenizer for a runtime's vocabulary, built once per runtime (about a second
    for a 152k-token vocabulary) and kept while the runtime lives."""
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(runtime)
        if found is None:
            import llguidance

            tokens = _VocabTokens(runtime)
            eog = sorted(runtime.vocab.eog) or [tokens.eos_token_id]
            found = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(tokens), n_vocab=runtime.vocab.n_vocab, eos_token=eog
            )
            _TOKENIZERS[runtime] = found
        return found


_MATCHERS: weakref.WeakKeyDictionary[Any, dict[Grammar, Any]] = weakref.WeakKeyDictionary()
_MATCHERS_PER_RUNTIME = 16


def _fresh_matcher(grammar: Grammar, runtime: Runtime) -> Any:
    """A matcher at the grammar's start: a copy of one built once per runtime and grammar (a
    copy costs about a microsecond; building one, about a millisecond even for a small grammar)."""
    import llguidance

    tokenizer = tokenizer_for(runtime)
    with _TOKENIZERS_LOCK:
        built = _MATCHERS.setdefault(runtime, {})
        template = built.get(grammar)
    if template is None:
        template = llguidance.LLMatcher(tokenizer, grammar.compiled(), log_level=0)
        if template.is_error():
            raise SettingsError(f"the {grammar.label} is not valid: {_first_line(template.get_error())}")
        with _TOKENIZERS_LOCK:
            if len(built) >= _MATCHERS_PER_RUNTIME:
                built.pop(next(iter(built)))
            built[grammar] = template
    return template.deep_copy()


class Constraint:
    """One generation's grammar matcher over a target's vocabulary.

    Its state follows the accepted tokens: `consume` advances it, `rollback` undoes the latest
    tokens (a rejected draft), `allowed` gives the mask for the next token.

    An end-of-generation token is allowed only where the output is complete. The matcher itself
    never sees one: a draft may run past it (those tokens are never output), so from an end token
    on, tokens are only counted, anything is allowed, and rolling back over them is exact.

    Args:
        grammar: the checked grammar.
        runtime: the target runtime, whose vocabulary the masks cover.
    """

    def __init__(self, grammar: Grammar, runtime: Runtime) -> None:
        self.grammar = grammar
        self.n_vocab = runtime.vocab.n_vocab
        self._eog = runtime.vocab.eog
        self._matcher = _fresh_matcher(grammar, runtime)
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        #: tokens consumed since the start (the output so far, plus any draft being checked)
        self.depth = 0
        self._past_end = 0  # tokens consumed from the first end token on (0: none yet)

    def allowed(self) -> np.ndarray:
        """Which tokens may come next: bool array (n_vocab,)."""
        if self._past_end:
            return np.ones(self.n_vocab, dtype=np.bool_)
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self.n_vocab)
        return bits.view(np.bool_)

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next (its canonical tokenization of the only
        text it allows), possibly none."""
        if limit <= 0 or self._past_end:
            return []
        tokens = self._matcher.compute_ff_tokens()[:limit]
        self._check()
        return [int(t) for t in tokens]

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar allows in a row from here (the state is unchanged)."""
        tokens = [int(t) for t in tokens]
        if self._past_end:
            return len(tokens)
        end = next((i for i, t in enumerate(tokens) if t in self._eog), len(tokens))
        n = int(self._matcher.validate_tokens(tokens[:end])) if end else 0
        if n < end or end == len(tokens):
            return n
        # tokens[end] ends the output: allowed when what comes before it is complete
        self.consume(tokens[:end])
        complete = self.accepting
        self.rollback(end)
        return len(tokens) if complete else end

    def consume(self, tokens: Sequence[int]) -> None:
        """Advance over tokens that the grammar allows (RuntimeFailure otherwise: a bug)."""
        for token in tokens:
            token = int(token)
            if not self._past_end and token in self._eog and not self.accepting:
                raise RuntimeFailure(f"the output ended before the {self.grammar.label} was complete")
            if self._past_end or token in self._eog:
                self._past_end += 1
            elif not self._matcher.consume_token(token):
                raise RuntimeFailure(
                    f"token {token} broke the {self.grammar.label}: {_first_line(self._matcher.get_error())}"
                )
            self.depth += 1

    def rollback(self, n: int) -> None:
        """Undo the latest n consumed tokens."""
        if n <= 0:
            return
        if n > self.depth:
            raise RuntimeFailure(
                f"cannot undo {n} tokens of the {self.grammar.label}: only {self.depth} were consumed"
            )
        past = min(n, self._past_end)
        self._past_end -= past
        if n > past and not self._matcher.rollback(n - past):
            raise RuntimeFailure(f"cannot undo {n} tokens of the {self.grammar.label}")
        self.depth -= n

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete under the grammar."""
        return self._past_end > 0 or bool(self._matcher.is_accepting())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeFailure(f"the {self.grammar.label} failed: {_first_line(self._matcher.get_error())}")


class RowMasks(Sequence[np.ndarray]):
    """The masks for the rows of one verification pass, each computed when first read: row i holds
    what the grammar allows after the output plus draft[:i]. Reading row i advances the matcher
    over draft[:i]; `release` puts it back where it was.

    Args:
        constraint: the generation's constraint, at the state after the output so far.
        draft: the draft being verified (every token valid under the grammar).
    """

    def __init__(self, constraint: Constraint, draft: Sequence[int]) -> None:
        self._constraint = constraint
        self._draft = draft
        self._masks: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._draft) + 1

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        while len(self._masks) <= i:
            if self._masks:
                self._constraint.consume([self._draft[len(self._masks) - 1]])
            self._masks.append(self._constraint.allowed())
        return self._masks[i]

    def release(self) -> None:
        """Roll the matcher back over the draft tokens it was advanced by."""
        self._constraint.rollback(max(len(self._masks) - 1, 0))
        self._masks = []


def grammar_from_options(
    *,
    json_schema: Any = None,
    regex: Any = None,
    grammar: Any = None,
    response_format: Any = None,
) -> Grammar | None:
    """The one grammar a request asks for, from whichever of its ways of asking it used: a JSON
    schema (an object or its JSON text), a regular expression, a grammar (Lark or GBNF text, or
    a `Grammar`), or OpenAI's `response_format`. None when none is given; a SettingsError naming
    the options when more than one is."""
    given = {
        name: value
        for name, value in (
            ("json_schema", json_schema),
            ("regex", regex),
            ("grammar", grammar),
            ("response_format", response_format),
        )
        if value is not None
    }
    if len(given) > 1:
        raise SettingsError(f"give one constraint, not several: got {', '.join(given)}")
    if json_schema is not None:
        return Grammar.json_schema(json_schema)
    if regex is not None:
        return Grammar.regex(regex)
    if grammar is not None:
        return grammar if isinstance(grammar, Grammar) else Grammar.from_text(grammar)
    if response_format is not None:
        return from_response_format(response_format)
    return None


def from_response_format(value: Any) -> Grammar | None:
    """The grammar for OpenAI's `response_format`: {"type": "text"} (none), {"type": "json_object"}
    or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    if not isinstance(value, Mapping):
        raise SettingsError("response_format must be an object with a 'type'")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind != "json_schema":
        raise SettingsError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise SettingsError("response_format.json_schema must be an object with a 'schema'")
    schema = spec.get("schema")
    if schema is None:
        return Grammar.json_object()
    if not isinstance(schema, Mapping):
        raise SettingsError("response_format.json_schema.schema must be an object")
    return Grammar.json_schema(schema)
