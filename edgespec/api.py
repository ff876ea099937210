"""The Python API for apps that embed edgespec: `edgespec.Engine`.

    from edgespec import Engine

    with Engine() as engine:                      # the default pair, placed and tuned for this machine
        print(engine.generate("Explain recursion in one sentence.", max_tokens=64).text)
        for chunk in engine.chat([{"role": "user", "content": "Hi!"}], stream=True):
            print(chunk.text, end="", flush=True)

An engine runs one generation at a time (with `parallel=N`, N at once in shared passes, see
`edgespec.batching`). Calls from other threads wait their turn, first come first served, or give up
with `EngineBusy` after `timeout` seconds. `Engine.cancel()` (from any
thread) stops the running generation before its next step. The caches are kept between calls, so a
chat's next turn evaluates only what follows the longest common prefix with the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from edgespec.chat import chat_tokens, prompt_tokens
from edgespec.constrain import Grammar, grammar_from_options
from edgespec.defaults import DRAFT_MAX, N_CTX
from edgespec.engine import FinishReason, Generation, GenerationSettings, Stats, TokenLogprob
from edgespec.errors import EdgespecError, EngineBusy, PromptError, SettingsError, encode_utf8
from edgespec.sampling import LogitsProcessor, SamplingSettings
from edgespec.tools import ToolCall, ToolPlan, plan_tools, read_tool_choice, read_tools, template_messages

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from edgespec.control import SourceStats
    from edgespec.load.builder import EngineSpec, LoadedPair
    from edgespec.placement.profiles import Profile

__all__ = [
    "Chunk",
    "Engine",
    "EngineBusy",
    "GenerateOptions",
    "Grammar",
    "Result",
    "Stream",
    "TokenLogprob",
]

ROLES = ("system", "user", "assistant", "tool")


class GenerateOptions(TypedDict, total=False):
    """Per-call options of `Engine.generate`, `stream` and `chat` (all optional).

    max_tokens (256), draft_max (the engine's), stop (a string or several), seed, cache_prompt
    (True: reuse the cached prefix, see `GenerationSettings`), and the
    sampling settings of `edgespec.sampling.SamplingSettings`: temperature (0: greedy), top_k,
    top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty, penalty_last_n, logit_bias,
    accept.

    At most one constraint on the output: json_schema (a JSON schema, as an object or its JSON
    text), regex (a regular expression the whole output matches), grammar (a context-free grammar
    in Lark or GBNF syntax, or an `edgespec.Grammar`), or response_format (OpenAI's, e.g.
    {"type": "json_object"}). A bad one is a SettingsError before generation starts.

    logprobs: None (default) or n from 0 to 20: report each token's log-probability under the
    target model and the n most likely tokens at its position (`Result.logprobs`, `Chunk.logprob`;
    see `GenerationSettings.logprobs`).
    """

    max_tokens: int
    draft_max: int
    stop: str | Sequence[str]
    seed: int | None
    cache_prompt: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    penalty_last_n: int
    logit_bias: Mapping[int, float]
    accept: str
    json_schema: Mapping[str, Any] | str
    regex: str
    grammar: str | Grammar
    response_format: Mapping[str, Any]
    logprobs: int | None


_GENERATION_KEYS = ("max_tokens", "draft_max", "stop", "seed", "cache_prompt", "logprobs")
_CONSTRAINT_KEYS = ("json_schema", "regex", "grammar", "response_format")
_OPTION_KEYS = frozenset(GenerateOptions.__annotations__)


@dataclass(frozen=True)
class Chunk:
    """One accepted token of a streamed generation.

    Attributes:
        text: the text it made safe to show (may be "" while a multi-byte character or a possible
            stop string is incomplete, or several characters).
        token: its token id; None for the last chunk of a stream when it only carries text held
            back until the end (the start of a possible stop string, an unfinished character).
        from_draft: True when a drafter proposed it and the target accepted it.
        logprob: its log-probability and the alternatives, with the `logprobs` option; else None.
    """

    text: str
    token: int | None
    from_draft: bool
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Result:
    """A finished generation.

    Attributes:
        text: the generated text (stop strings excluded).
        tokens: the generated token ids (an end-of-generation token excluded).
        finish_reason: "stop", "length" or "cancelled".
        prompt_tokens: tokens in the prompt (stats.n_prompt_cached of them came from the cache).
        seed: the sampling seed used (given, or drawn fresh).
        stats: timings and drafting statistics.
        sources: with a goodput controller, how often each draft source was chosen; else None.
        tool_calls: the calls the answer made, when tools were offered (finish_reason is then
            "tool_calls"); `content` is the text before them (None when there is none).
        logprobs: with the `logprobs` option, one `TokenLogprob` per token of `tokens`; else None.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    seed: int
    stats: Stats
    sources: Mapping[str, SourceStats] | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    content: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class _FifoLock:
    """A lock granted in the order it was asked for, with a timeout, that knows its owner."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self.owner: int | None = None

    def acquire(self, timeout: float | None) -> bool:
        with self._cond:
            ticket = object()
            self._queue.append(ticket)
            granted = self._cond.wait_for(lambda: self.owner is None and self._queue[0] is ticket, timeout)
            self._queue.remove(ticket)
            if granted:
                self.owner = threading.get_ident()
            else:
                self._cond.notify_all()  # the next in line may be free to go
            return granted

    def release(self) -> None:
        with self._cond:
            self.owner = None
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)


class Stream:
    """The chunks of one generation as they are accepted; `result` is set once it ends.

    A stream holds its engine until it is exhausted, closed, or garbage-collected: other calls
    wait meanwhile. Breaking out of a `for` loop early is fine in CPython; `with engine.stream(...)
    as s:` makes the release explicit. `cancel()` stops it before the next step (safe from any
    thread); `close()` stops it at once.
    """

    def __init__(self, engine: Engine, generation: Generation, tools: ToolPlan | None = None) -> None:
        self._engine = engine
        self._generation = generation
        self._tools = tools
        self._tokens = iter(generation)
        self._shown = 0  # characters of text given out in chunks
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self.result is not None:
            raise StopIteration
        try:
            token = next(self._tokens)
        except StopIteration:
            self._finish()
            assert self.result is not None
            tail = self.result.text[self._shown :]
            if tail:  # the chunks' texts always add up to the result's text
                self._shown += len(tail)
                return Chunk(tail, None, False)
            raise
        except BaseException:
            self._finish()
            raise
        self._shown += len(token.text)
        return Chunk(token.text, token.id, token.from_draft, token.logprob)

    def visible(self, text: str) -> int:
        """How much of the text streamed so far is answer text to show: all of it, or with tools,
        what comes before anything that may start a call (calls come parsed in the result)."""
        return len(text) if self._tools is None else self._tools.visible(text)

    def run(self) -> Result:
        """Consume the rest of the stream and return its result (the engine is released even if
        consuming fails)."""
        with self:
            for _ in self:
                pass
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        """Stop before the next step; chunks already accepted may still come."""
        self._generation.cancel()

    def close(self) -> None:
        """Stop now and release the engine; `result` holds what was generated."""
        if self.result is None:
            self._generation.cancel()
            self._finish()

    def _finish(self) -> None:
        if self.result is not None:
            return
        generation = self._generation
        try:
            self._tokens.close()  # type: ignore[attr-defined]  # a generator: runs its cleanup
        finally:
            drafter = generation.drafter
            finish: FinishReason = generation.finish_reason or "cancelled"
            content: str | None = generation.text
            calls: list[ToolCall] = []
            if self._tools is not None and finish == "stop":
                content, calls = self._tools.parse(generation.text)
                finish = "tool_calls" if calls else finish
            self.result = Result(
                text=generation.text,
                tokens=list(generation.tokens),
                finish_reason=finish,
                prompt_tokens=generation.stats.n_prompt,
                seed=generation.seed,
                stats=generation.stats,
                sources=drafter.summary() if drafter is not None else None,
                tool_calls=tuple(calls),
                content=content,
                logprobs=None if generation.settings.logprobs is None else tuple(generation.logprobs),
            )
            self._engine._release(self._generation)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "result", True) is None:
            self.close()


class Engine:
    """A loaded target and drafter, ready to generate; thread-safe.

    Args:
        target: target GGUF path, or None for the default target (Qwen2.5-Coder-1.5B-Instruct).
        draft: draft model (GGUF path, ONNX export folder, or "default"), "ngram" (prompt lookup)
            or "none" (target only). Given without `profile`, it drafts every step.
        profile: placement profile: a name, a .toml path, or "auto" (detected for this machine,
            tuned on first use and saved). When neither `draft` nor `draft_max` is given, "auto".
        draft_max: most draft tokens per step (default 4; with a profile, the profile's).
        n_ctx: context size in tokens (prompt + answer).
        threads, draft_threads: CPU threads for the target and the draft model.
        gpu_layers, draft_gpu_layers: layers to offload to a GPU (-1: all).
        kernels: "fast" (llama.cpp's own kernels: output the target's in distribution; the default)
            or "exact" (row-invariant kernels, verified on this machine: output token-identical to
            target-only). Overrides the profile's.
        cache_prompt: the default of the per-call option: reuse the cached prefix of the previous
            call (True), or evaluate every prompt whole, so that greedy output depends on the
            prompt alone (False; see `GenerationSettings.cache_prompt`).
        flash_attn: "auto", "on" or "off" (without a profile; off, as llama-cpp-python's `Llama`:
            on this CPU it made a step 19% slower at 2,000-3,500 tokens of context).
        draft_provider: ONNX Runtime provider for an ONNX drafter.
        verbose: let llama.cpp's log lines through.
        parallel: generations served at once (continuous batching, `edgespec.batching`): the
            target's context holds this many sequences, and calls from several threads generate
            together, sharing each model's passes, instead of waiting their turn. 1 (the default):
            one at a time, first come first served. Under `kernels="exact"` every answer is the
            one it gets served alone.
        progress: progress factory for joining a default model on first use (`models.resolve`).
        tune_progress: `tune_progress(total)` → a progress bar while a profile is tuned.
        on_note: told, one line each, what was decided (automatic placement, tuning).

    Raises:
        EdgespecError: a model is missing or unusable, the pair is incompatible, or a setting is
            out of range.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | None = None,
        draft: str | os.PathLike[str] | None = None,
        *,
        profile: str | os.PathLike[str] | None = None,
        draft_max: int | None = None,
        n_ctx: int = N_CTX,
        threads: int | None = None,
        draft_threads: int | None = None,
        gpu_layers: int | None = None,
        draft_gpu_layers: int | None = None,
        kernels: str | None = None,
        flash_attn: str = "off",
        draft_provider: str | None = None,
        cache_prompt: bool = True,
        verbose: bool = False,
        parallel: int = 1,
        progress: Callable[..., Any] | None = None,
        tune_progress: Callable[[int], Any] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        # Loading (and its placement and memory modules) is imported when an engine is built, not
        # with `from edgespec import Engine`: about 50 ms less for an app that imports and waits.
        from edgespec.load.builder import EngineSpec

        spec = EngineSpec(
            target,
            draft,
            profile,
            draft_max,
            n_ctx,
            threads,
            draft_threads,
            gpu_layers,
            draft_gpu_layers,
            kernels,
            flash_attn,
            draft_provider,
            verbose,
            parallel=parallel,
        )
        self._build(spec, cache_prompt, progress, tune_progress, on_note)

    @classmethod
    def from_spec(
        cls,
        spec: EngineSpec,
        *,
        cache_prompt: bool = True,
        progress: Callable[..., Any] | None = None,
        tune_progress: Callable[[int], Any] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> Engine:
        """The engine `spec` describes (the CLI's and the server's way in); arguments as for
        `Engine`."""
        engine = cls.__new__(cls)
        engine._build(spec, cache_prompt, progress, tune_progress, on_note)
        return engine

    def _build(
        self,
        spec: EngineSpec,
        cache_prompt: bool,
        progress: Callable[..., Any] | None,
        tune_progress: Callable[[int], Any] | None,
        on_note: Callable[[str], None] | None,
    ) -> None:
        from edgespec.load.builder import build

        built = build(spec, progress=progress, tune_progress=tune_progress, on_note=on_note)
        self.profile = built.profile
        self._init(built.pair, built.draft_max, cache_prompt)

    @classmethod
    def from_pair(
        cls,
        pair: LoadedPair,
        draft_max: int = DRAFT_MAX,
        profile: Profile | None = None,
        cache_prompt: bool = True,
    ) -> Engine:
        """An engine over models loaded with `edgespec.load.builder` (it takes ownership of them)."""
        engine = cls.__new__(cls)
        engine.profile = profile
        engine._init(pair, draft_max, cache_prompt)
        return engine

    def _init(self, pair: LoadedPair, draft_max: int, cache_prompt: bool) -> None:
        GenerationSettings(draft_max=draft_max)  # range check
        self._pair = pair
        self.draft_max = draft_max
        self.cache_prompt = cache_prompt
        self._lock = _FifoLock()
        self._current: Generation | None = None
        self._slots = pair.slots  # None: one generation at a time, under `_lock`
        self._running: dict[Generation, int] = {}  # with slots: each running generation's slot
        self._owners: dict[Generation, int] = {}  # and the thread that started it
        self._closed = False
        # Calls that use the model outside the lock (tokenizing, which must not wait for a running
        # generation); close() waits for them to leave before it frees the model.
        self._users = 0
        self._users_left = threading.Condition()

    # -- what it is ---------------------------------------------------------------------------

    @property
    def target_path(self) -> Path:
        return self._pair.target_path

    @property
    def closed(self) -> bool:
        """Whether `close` has freed the models."""
        return self._closed

    @property
    def model(self) -> str:
        """The target model's name (its file name without .gguf), as the server lists it."""
        return self._pair.target_path.stem

    @property
    def draft(self) -> str:
        """What drafts: a draft model's path, "ngram", "none", or "profile NAME"."""
        return self._pair.draft

    @property
    def draft_name(self) -> str:
        """What drafts, as reports name it: "none", "ngram", "profile NAME" or a file name."""
        return self._pair.draft_name

    @property
    def draft_label(self) -> str:
        """What drafts, as statistics lines name it: "none", "ngram", "profile NAME" or "draft FILE"."""
        return self._pair.draft_label

    @property
    def n_ctx(self) -> int:
        return self._pair.engine.target.n_ctx

    @property
    def guarantee(self) -> str:
        """What its output promises: "exact" (token-identical to target-only decoding under the
        same kernels; `kernels="exact"`) or "distribution" (llama.cpp's kernels: the target's
        output in distribution, a greedy near-tie may break otherwise)."""
        return self._pair.engine.target.guarantee

    @property
    def drafter(self) -> Any:
        return self._pair.engine.drafter

    @property
    def parallel(self) -> int:
        """Generations served at once."""
        return 1 if self._slots is None else len(self._slots)

    @property
    def running(self) -> int:
        """Generations running or streams open now."""
        if self._slots is None:
            return int(self._lock.owner is not None)
        return self._slots.busy

    @property
    def busy(self) -> bool:
        """True while a generation runs or a stream is open (with `parallel`: every slot)."""
        if self._slots is None:
            return self._lock.owner is not None
        return self._slots.busy == len(self._slots)

    @property
    def waiting(self) -> int:
        """Calls waiting for the engine."""
        return self._lock.waiting if self._slots is None else self._slots.waiting

    # -- prompts ------------------------------------------------------------------------------

    def tokenize(self, prompt: str, *, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt: through the model's chat template as one user message (with
        an optional system message), or as it is with `raw`."""
        encode_utf8(prompt, "the prompt")  # named here: the template's text would move the position
        if system is not None:
            encode_utf8(system, "the system message")
        with self._model_in_use():
            return prompt_tokens(self._pair.engine.target, prompt, raw=raw, system=system)

    def chat_tokens(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
    ) -> list[int]:
        """Token ids for a conversation, rendered with the model's chat template, ending with the
        header of the assistant's answer. `tools` (OpenAI's format, or `Tool`s) are rendered by
        the template, or described in a system message when the template has no place for them."""
        check_messages(messages)
        offered = read_tools(tools) if tools is not None else None
        with self._model_in_use():
            target = self._pair.engine.target
            template = target.chat_template()
            if not template:
                raise PromptError(f"{target.path.name} has no chat template (tokenizer.chat_template)")
            rendered, specs = template_messages(messages, offered, template)
            return chat_tokens(target, template, rendered, specs)

    def plan_tools(
        self, tools: Sequence[Any], tool_choice: Any = None, parallel_tool_calls: Any = None
    ) -> ToolPlan:
        """How an answer offered `tools` is generated and read (see `edgespec.tools`); a
        SettingsError naming the field when the tools or the choice are malformed."""
        offered = read_tools(tools)
        choice = read_tool_choice(tool_choice, offered, parallel_tool_calls)
        with self._model_in_use():
            target = self._pair.engine.target
            return plan_tools(target, target.chat_template(), offered, choice)

    # -- generating ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        raw: bool = False,
        system: str | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Result:
        """Generate an answer to `prompt` and return it whole.

        Args:
            prompt: text (sent through the chat template as a user message unless `raw`) or token ids.
            system: a system message for the chat template.
            timeout: seconds to wait while another generation runs (None: as long as it takes);
                then `EngineBusy`.
            options: see `GenerateOptions`.
        """
        return self.stream(prompt, raw=raw, system=system, timeout=timeout, **options).run()

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        raw: bool = False,
        system: str | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Stream:
        """Start generating; iterate the returned `Stream` for chunks as tokens are accepted.

        The engine is held from this call until the stream ends or is closed. Arguments as for
        `generate`.
        """
        settings = self.check_options(**options)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, raw=raw, system=system)
        else:
            tokens = self._checked_ids(prompt)
        return self._start(tokens, settings, timeout)

    def _checked_ids(self, prompt: object) -> list[int]:
        """A prompt given as token ids, checked: a PromptError for bytes (which would read as a
        list of byte values) or for anything that is not an id of this model's vocabulary."""
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise PromptError(
                "the prompt is bytes: give text (a str, e.g. data.decode('utf-8')) or a list of token ids"
            )
        if not isinstance(prompt, Iterable):
            raise PromptError(f"the prompt must be text or a list of token ids, got {type(prompt).__name__}")
        n_vocab = self._pair.engine.target.vocab.n_vocab
        tokens = []
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise PromptError(f"token {i} of the prompt is not an integer id: {token!r}")
            if not 0 <= int(token) < n_vocab:
                raise PromptError(
                    f"token {i} of the prompt, {int(token)}, is not in the vocabulary (0 to {n_vocab - 1})"
                )
            tokens.append(int(token))
        return tokens

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool = False,
        timeout: float | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Any:
        """Answer a conversation: [{"role": "system" | "user" | "assistant" | "tool", "content":
        str}, ...], where an assistant message may carry OpenAI-style `tool_calls` and a tool
        message answers one (`tool_call_id`).

        With `tools` (OpenAI's format), the answer may call them: `tool_choice` is "auto" (the
        default), "none", "required" or {"type": "function", "function": {"name": ...}}; the
        calls are generated under a grammar, so their arguments match the tools' schemas, and come
        back parsed in `Result.tool_calls` (finish_reason "tool_calls").

        Returns a `Result`, or with `stream=True` a `Stream`. Only the tokens after the longest
        common prefix with the previous call's are evaluated, so sending the whole conversation
        again each turn is cheap.
        """
        settings = self.check_options(**options)
        plan = None
        if tools is not None:
            plan = self.plan_tools(tools, tool_choice, parallel_tool_calls)
            if plan.grammar is not None and settings.grammar is not None:
                raise SettingsError("tools that may be called cannot be combined with another constraint")
            settings = dataclasses.replace(settings, grammar=settings.grammar or plan.grammar)
        elif tool_choice is not None or parallel_tool_calls is not None:
            raise SettingsError("tool_choice and parallel_tool_calls need tools")
        offered = plan.tools if plan is not None else None  # read once, in plan_tools
        started = self._start(self.chat_tokens(messages, offered), settings, timeout, plan)
        return started if stream else started.run()

    def cancel(self) -> bool:
        """Stop the running generation (with `parallel`: every one) before its next step (from
        any thread). Returns whether one was running."""
        running = [self._current] if self._slots is None else list(self._running)
        for generation in running:
            if generation is not None:
                generation.cancel()
        return any(g is not None for g in running)

    def reset(self) -> None:
        """Forget the cached conversation: the next prompt is evaluated whole."""
        if self._slots is not None:
            with self._every_slot():
                for engine in self._slots.engines:
                    engine.forget()
            return
        if not self._acquire(None):
            return
        try:
            self._pair.engine.forget()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _every_slot(self) -> Iterator[None]:
        """Hold every slot (waiting for the running generations to end). A thread that holds an
        open stream would wait for itself: EngineBusy, as with one generation at a time."""
        assert self._slots is not None
        if threading.get_ident() in self._owners.values():
            raise EngineBusy("close the open stream before closing or resetting its engine")
        held = [self._slots.acquire(()) for _ in range(len(self._slots))]
        try:
            yield
        finally:
            for slot in held:
                self._slots.release(slot)

    def close(self) -> None:
        """Wait for a running generation (cancelling it) and free the models."""
        if self._closed:
            return
        if self._slots is not None and threading.get_ident() in self._owners.values():
            raise EngineBusy("close the open stream before closing its engine")  # before cancelling
        self.cancel()
        if self._slots is not None:
            with self._every_slot(), self._users_left:
                self._closed = True
                self._users_left.wait_for(lambda: self._users == 0)
            self._pair.close()
            return
        if self._lock.owner == threading.get_ident():
            raise EngineBusy("close the open stream before closing its engine")
        self._lock.acquire(None)
        try:
            with self._users_left:
                if self._closed:
                    return
                self._closed = True  # no new tokenizing starts; wait for any running to end
                self._users_left.wait_for(lambda: self._users == 0)
            self._pair.close()
        finally:
            self._lock.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EdgespecError("the engine is closed")

    @contextlib.contextmanager
    def _model_in_use(self) -> Iterator[None]:
        """Hold the model open (against `close`) without taking the generation lock."""
        with self._users_left:
            self._check_open()
            self._users += 1
        try:
            yield
        finally:
            with self._users_left:
                self._users -= 1
                self._users_left.notify_all()

    def check_options(self, **options: Any) -> GenerationSettings:
        """Check per-call options (see `GenerateOptions`) without generating: the settings they
        make, or a one-line `SettingsError` naming the option (e.g. before a request is queued)."""
        unknown = sorted(set(options) - _OPTION_KEYS)
        if unknown:
            raise SettingsError(
                f"unknown option {unknown[0]!r}; expected one of: {', '.join(sorted(_OPTION_KEYS))}"
            )
        for key, value in options.items():
            _check_type(key, value)
        values = dict(options)
        grammar = grammar_from_options(**{key: values.pop(key) for key in _CONSTRAINT_KEYS if key in values})
        general = {key: values.pop(key) for key in _GENERATION_KEYS if key in values}
        stop = general.get("stop", ())
        general["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        general.setdefault("draft_max", self.draft_max)
        general.setdefault("cache_prompt", self.cache_prompt)
        settings = GenerationSettings(**general, sampling=SamplingSettings(**values), grammar=grammar)
        LogitsProcessor(settings.sampling, self._pair.engine.target.vocab.n_vocab)  # logit_bias ids
        return settings

    def _acquire(self, timeout: float | None) -> bool:
        self._check_open()
        if self._lock.owner == threading.get_ident():
            raise EngineBusy("this thread has an open stream on this engine: finish or close it first")
        if not self._lock.acquire(timeout):
            raise EngineBusy(f"the engine is busy with another generation (waited {timeout:g} s)")
        if self._closed:
            self._lock.release()
            raise EdgespecError("the engine is closed")
        return True

    def _start(
        self,
        tokens: list[int],
        settings: GenerationSettings,
        timeout: float | None,
        tools: ToolPlan | None = None,
    ) -> Stream:
        if self._slots is not None:
            return self._start_in_slot(tokens, settings, timeout, tools)
        self._acquire(timeout)
        try:
            generation = self._pair.engine.generate(tokens, settings)
        except BaseException:
            self._lock.release()
            raise
        self._current = generation
        return Stream(self, generation, tools)

    def _start_in_slot(
        self, tokens: list[int], settings: GenerationSettings, timeout: float | None, tools: ToolPlan | None
    ) -> Stream:
        assert self._slots is not None
        self._check_open()
        slot = self._slots.acquire(tokens, timeout, reuse=settings.cache_prompt)
        try:
            if self._closed:
                raise EdgespecError("the engine is closed")
            generation = self._slots.engines[slot].generate(tokens, settings)
        except BaseException:
            self._slots.release(slot)
            raise
        self._running[generation] = slot
        self._owners[generation] = threading.get_ident()
        return Stream(self, generation, tools)

    def _release(self, generation: Generation) -> None:
        if self._slots is not None:
            slot = self._running.pop(generation, None)
            self._owners.pop(generation, None)
            if slot is not None:
                self._slots.release(slot)
            return
        if self._current is generation:
            self._current = None
            self._lock.release()


_INTS = frozenset({"max_tokens", "draft_max", "top_k", "penalty_last_n", "seed", "logprobs"})
_NUMBERS = frozenset(
    {"temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"}
)


def _check_type(key: str, value: Any) -> None:
    """SettingsError naming the option when a value has the wrong type (ranges are checked by
    the settings themselves)."""
    # constraints are checked by their type
    if (key in ("seed", "logprobs") and value is None) or key in _CONSTRAINT_KEYS:
        return
    if key == "cache_prompt":
        if not isinstance(value, bool):
            raise SettingsError(f"cache_prompt must be true or false, got {value!r}")
        return
    if isinstance(value, bool) or (
        (key in _INTS and not isinstance(value, numbers.Integral))
        or (key in _NUMBERS and not isinstance(value, numbers.Real))
    ):
        kind = "an integer" if key in _INTS else "a number"
        raise SettingsError(f"{key} must be {kind}, got {value!r}")
    if key == "stop" and not (
        isinstance(value, str) or (isinstance(value, Sequence) and all(isinstance(v, str) for v in value))
    ):
        raise SettingsError(f"stop must be a string or a list of strings, got {value!r}")
    if key == "logit_bias" and not isinstance(value, Mapping):
        raise SettingsError(f"logit_bias must map token ids to numbers, got {value!r}")
    if key == "accept" and not isinstance(value, str):
        raise SettingsError(f"accept must be 'rejection' or 'exact', got {value!r}")


def check_messages(messages: Any) -> None:
    """Raise PromptError unless `messages` is a non-empty list of {"role", "content"} mappings
    with a known role and text content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PromptError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PromptError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise PromptError(f"messages[{i}].tool_calls belong to an assistant message")
            _check_calls(i, calls)
            if content is None:
                continue
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string")
        encode_utf8(content, f"messages[{i}].content")


def _check_calls(i: int, calls: Any) -> None:
    """An assistant message's tool_calls: [{"id", "type": "function", "function": {"name",
    "arguments" (JSON text or an object)}}]."""
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise PromptError(f"messages[{i}].tool_calls must be a list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise PromptError(
                f"messages[{i}].tool_calls[{j}] must be {{'type': 'function', 'function': {{...}}}}"
            )
        if not isinstance(function.get("arguments", {}), (str, Mapping)):
            raise PromptError(f"messages[{i}].tool_calls[{j}].function.arguments must be JSON text")
