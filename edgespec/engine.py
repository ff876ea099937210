"""The draft → verify loop, as a generator of accepted tokens.

Invariant: the target's KV cache holds every context token except the newest one. Each step
evaluates [newest token] + draft (k + 1 positions) in one target pass with logits for every row,
keeps the longest draft prefix the target agrees with plus the target's own next token, and rolls
the target cache back over the rejected positions. With no draft (k = 0) a step is one ordinary
decoding step, so target-only decoding runs through the very same loop.

Greedy decoding (temperature 0) keeps a draft token when it equals the target's argmax. With
temperature > 0 the model drafter samples its draft from q and verification is speculative
sampling (see `verify.verify_rejection`), or exact-match acceptance when asked; either way the
output is distributed exactly as the target alone would sample it.

A new generation keeps what the target's cache already holds up to the longest common prefix with
its prompt (`Runtime.tokens`), so a chat's next turn, which repeats the conversation so far,
evaluates only the new tokens; a model drafter does the same with its own cache.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgespec.constrain import Constraint, Grammar, RowMasks
from edgespec.defaults import DRAFT_MAX, K_LIMIT
from edgespec.drafting import NO_DRAFT, Draft, reuse_prefix
from edgespec.errors import PromptError, PromptTooLongError, SettingsError
from edgespec.sampling import (
    GREEDY,
    Dist,
    LazyDists,
    LogitsProcessor,
    Masks,
    SamplingSettings,
    TokenSampler,
    log_softmax_top,
)
from edgespec.text import TextStream
from edgespec.verify import verify_exact_match, verify_greedy, verify_greedy_by, verify_rejection

if TYPE_CHECKING:
    from edgespec.drafting import Drafter
    from edgespec.runtimes.base import Runtime

#: most alternatives a token's log-probabilities can list (OpenAI's limit for top_logprobs)
TOP_LOGPROBS_LIMIT = 20

#: "tool_calls" only from the API, for an answer that called tools (see `edgespec.tools`)
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


@dataclass(frozen=True)
class GenerationSettings:
    """Per-request settings.

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        draft_max: k, the most draft tokens proposed per step (0 disables drafting).
        stop: strings that end generation; not included in the text. One string is one stop
            string (as in the OpenAI API), not a sequence of one-character ones.
        seed: seed for sampling; the same seed and settings give the same output. None draws a
            fresh one, recorded as `Generation.seed`. Greedy decoding does not use it.
        cache_prompt: keep what the target's cache already holds up to the longest common prefix
            with the prompt, and evaluate only the rest (`edgespec.Engine` does by default). Those
            keys and values were computed in other batch shapes than one pass over this prompt,
            and llama.cpp's kernels round differently per batch shape, so near-ties may then break
            otherwise than in a fresh pass. False (the default here) evaluates the whole prompt,
            giving the output a fresh process gives.
        sampling: temperature, truncation, penalties, logit bias and the acceptance rule.
        grammar: what the output must match (a JSON schema, a regular expression or a grammar),
            or None. The tokens it forces are drafted for free, and every draft is cut at the
            first token it forbids (see `constrain`).
        logprobs: None (the default) reports no log-probabilities; n (0 … 20) gives each generated
            token's log-probability and the n most likely tokens at its position with theirs
            (`TokenLogprob`). They are the target model's own: the log-softmax of its logits,
            before bias, penalties, a grammar's mask, temperature and truncation. They are read
            from the verification pass's row for each accepted position, so under exact kernels
            they equal target-only decoding's, bit for bit.
    """

    max_tokens: int = 256
    draft_max: int = DRAFT_MAX
    stop: tuple[str, ...] = ()
    seed: int | None = None
    sampling: SamplingSettings = GREEDY
    cache_prompt: bool = False
    grammar: Grammar | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) for s in stop):
            raise SettingsError(f"stop must be a string or a sequence of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.max_tokens < 1:
            raise SettingsError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.draft_max < 0:
            raise SettingsError(f"draft_max must be 0 or more, got {self.draft_max}")
        if self.draft_max > K_LIMIT:
            raise SettingsError(f"draft_max must be at most {K_LIMIT}, got {self.draft_max}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise SettingsError(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= TOP_LOGPROBS_LIMIT:
            raise SettingsError(
                f"logprobs must be between 0 and {TOP_LOGPROBS_LIMIT} alternatives, got {self.logprobs}"
            )


@dataclass
class Stats:
    """What one generation cost and how well drafting worked.

    Times are seconds from `time.perf_counter`. t_prompt is prompt processing up to the first
    token, the drafter's own pass over the prompt included. A "step" is one target forward pass
    after the prompt; tokens_per_step (τ) counts the accepted draft tokens plus the target's own.
    n_prompt_cached of the n_prompt prompt tokens were already in the target's KV cache (the
    longest common prefix with what the previous generation left there) and were not evaluated.
    Under a grammar, n_forced of the drafted tokens were tokens it forced (free drafts), and
    n_forced_accepted of those were kept.
    `guarantee` is what the output promises: "exact" (token-identical to target-only decoding under
    the same kernels) or "distribution" (the target's in distribution; see `Runtime.guarantee`).
    """

    guarantee: str = "distribution"
    n_prompt: int = 0
    n_prompt_cached: int = 0
    n_generated: int = 0
    n_drafted: int = 0
    n_forced: int = 0
    n_forced_accepted: int = 0
    t_prompt: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_total: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)

    def record(self, n_drafted: int, n_accepted: int) -> None:
        """One verification step: n_accepted of n_drafted draft tokens were kept."""
        self.n_drafted += n_drafted
        self.accepted_per_step.append(n_accepted)

    @property
    def n_steps(self) -> int:
        """Target forward passes after the prompt's."""
        return len(self.accepted_per_step)

    @property
    def n_accepted(self) -> int:
        return sum(self.accepted_per_step)

    @property
    def t_decode(self) -> float:
        """Time after the first token (which the prompt pass produces)."""
        return max(self.t_total - self.t_prompt, 0.0)

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed: tokens after the first over the time after the first."""
        return (self.n_generated - 1) / self.t_decode if self.n_generated > 1 and self.t_decode > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """τ: mean accepted tokens per target forward pass (accepted drafts + the target's own)."""
        return (self.n_steps + self.n_accepted) / self.n_steps if self.n_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("accepted_per_step")
        counts = ("guarantee", "n_prompt", "n_prompt_cached", "n_generated")
        data = {
            **{key: data.pop(key) for key in counts},
            "n_steps": self.n_steps,
            "n_drafted": data.pop("n_drafted"),
            "n_accepted": self.n_accepted,
            **data,
        }
        data.update(
            t_decode=self.t_decode,
            tokens_per_second=self.tokens_per_second,
            tokens_per_step=self.tokens_per_step,
            acceptance_rate=self.acceptance_rate,
        )
        return data


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the target model at one position.

    Attributes:
        id: token id.
        bytes: its bytes (a piece of a multi-byte character may be only part of one).
        logprob: natural log of its probability (the log-softmax of the raw logits).
        top: the most likely tokens at this position, largest first (empty for an alternative
            itself, or when none were asked for).
    """

    id: int
    bytes: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    @property
    def text(self) -> str:
        return self.bytes.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Token:
    """One generated token as it is accepted.

    Attributes:
        id: token id.
        text: text that became safe to emit with this token (may be "", or several characters).
        from_draft: True if a drafter proposed it and the target accepted it.
        logprob: its log-probability and the alternatives, when `GenerationSettings.logprobs`
            asks for them; else None.
    """

    id: int
    text: str
    from_draft: bool
    logprob: TokenLogprob | None = None


#: one accepted token: (id, from_draft, its log-probabilities when asked for)
Accepted = tuple[int, bool, TokenLogprob | None]


class Generation:
    """One generation: iterate for tokens as they are accepted; afterwards read the result.

    Attributes (complete once iteration ends):
        tokens: generated token ids (an end-of-generation token is not included).
        logprobs: with `GenerationSettings.logprobs`, one `TokenLogprob` per token in `tokens`;
            else empty.
        text: generated text (stop strings excluded).
        finish_reason: "stop" (end-of-generation token or stop string), "length" (max_tokens or
            a full context) or "cancelled" (`cancel()` was called).
        stats: timings and drafting statistics.
    """

    def __init__(
        self, engine: SpeculativeEngine, prompt: Sequence[int], settings: GenerationSettings
    ) -> None:
        self._engine = engine
        self._prompt = list(prompt)
        self.settings = settings
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.stats = Stats(guarantee=engine.target.guarantee, n_prompt=len(prompt))
        #: the seed sampling used (settings.seed, or a fresh one)
        self.seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self._started = False
        self._cancel = threading.Event()
        self._context = list(prompt)  # prompt + accepted tokens
        sampling = settings.sampling
        self._rng = np.random.default_rng(self.seed)
        self._processor = LogitsProcessor(sampling, engine.target.vocab.n_vocab)  # p's pipeline
        #: the grammar's matcher, in step with the output (None: unconstrained)
        self._constraint = Constraint(settings.grammar, engine.target) if settings.grammar else None
        # The drafter gets a sampler whenever it must not take the raw argmax.
        adjusts = self._processor.adjusts or not sampling.greedy or self._constraint is not None
        self._draft_sampler = TokenSampler(sampling, self._rng, self._constraint) if adjusts else None
        self._verify = make_verifier(sampling, self._processor, self._rng)

    def cancel(self) -> None:
        """Stop before the next step; safe from any thread. Tokens already yielded stay; the
        generation ends with finish_reason "cancelled" (unless it had already finished)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[Token]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        return self._run()

    @property
    def drafter(self) -> Drafter | None:
        """The drafter this generation drafts with (its engine's)."""
        return self._engine.drafter

    def run(self) -> Generation:
        """Consume the whole generation and return self."""
        for _ in self:
            pass
        return self

    def _run(self) -> Iterator[Token]:
        """Text on top of the token loop: each token's text, stop strings, the final text."""
        start = time.perf_counter()
        stream = TextStream(self.settings.stop)
        token_bytes = self._engine.target.token_bytes
        parts: list[str] = []
        tokens: Generator[Accepted, None, None] = self._tokens(start)
        try:
            for token, from_draft, logprob in tokens:
                piece = stream.feed(token_bytes(token))
                if piece:
                    parts.append(piece)
                yield Token(token, piece, from_draft, logprob)
                if stream.stopped:
                    self.finish_reason = "stop"
                    return
        finally:
            tokens.close()
            parts.append(stream.flush())
            self.text = "".join(parts)
            self.stats.t_total = time.perf_counter() - start

    def _tokens(self, start: float) -> Generator[Accepted, None, None]:
        """The loop: the prompt pass, then draft → verify steps; yields (token, from_draft,
        logprob) as tokens are accepted, until an end-of-generation token, a limit or a cancel."""
        settings, context = self.settings, self._context
        eog, n_ctx = self._engine.target.vocab.eog, self._engine.target.n_ctx
        pending = self._prefill()
        self.stats.t_prompt = time.perf_counter() - start
        while True:
            for token, from_draft, logprob in pending:
                if token in eog:
                    self.finish_reason = "stop"
                    return
                if self._constraint is not None:
                    self._constraint.consume([token])
                context.append(token)
                self.tokens.append(token)
                if logprob is not None:
                    self.logprobs.append(logprob)
                self.stats.n_generated += 1
                yield token, from_draft, logprob
                if len(self.tokens) >= settings.max_tokens or len(context) >= n_ctx:
                    self.finish_reason = "length"
                    return
            if self._cancel.is_set():
                self.finish_reason = "cancelled"
                return
            pending = self._step()

    def _prefill(self) -> list[Accepted]:
        """Evaluate the prompt (past the prefix the cache already holds, with cache_prompt), show
        it to the drafter, and choose the first token."""
        target, drafter, context = self._engine.target, self._engine.drafter, self._context
        held = target.tokens if self.settings.cache_prompt else None
        # the last prompt token is always evaluated, for its logits
        keep = reuse_prefix(target, held or (), context, redo_last=True)
        p_logits = target.eval(context[keep:], logits="last")
        self.stats.n_prompt_cached = keep
        if drafter is not None:
            drafter.begin(context)
        mask = None if self._constraint is None else self._constraint.allowed()
        first, _ = self._processor.choose(p_logits[0], self._recents([])[0], self._rng, mask)
        return [(first, False, self._logprobs(p_logits, [first])[0])]

    def _step(self) -> list[Accepted]:
        """One speculative step: draft, verify the newest token plus the draft in one target
        pass, roll the cache back over rejected positions. Returns the accepted tokens (drafts,
        then the target's own)."""
        engine, settings, stats, context = self._engine, self.settings, self.stats, self._context
        target, drafter, clock = engine.target, engine.drafter, time.perf_counter
        # At most k tokens, no more than the output and the context still allow.
        k = min(settings.draft_max, settings.max_tokens - len(self.tokens) - 1, target.n_ctx - len(context))
        n_forced, proposal = self._draft(k)
        draft = proposal.tokens
        t0 = clock()
        p_logits = target.eval([context[-1], *draft], logits="all")
        masks = None if self._constraint is None else RowMasks(self._constraint, draft)
        n_accepted, next_token = self._verify(draft, proposal.q, p_logits, self._recents(draft), masks)
        if masks is not None:
            masks.release()
        # Keep the newest token and the accepted drafts; the next token is evaluated next step.
        target.truncate(len(context) + n_accepted)
        stats.t_verify += clock() - t0
        stats.record(len(draft), n_accepted)
        stats.n_forced += n_forced
        stats.n_forced_accepted += min(n_accepted, n_forced)
        if drafter is not None and len(draft) > n_forced:
            drafter.accepted(len(draft) - n_forced, max(n_accepted - n_forced, 0))
        accepted = [*draft[:n_accepted], next_token]
        logprobs = self._logprobs(p_logits, accepted)
        return [(t, i < n_accepted, logprobs[i]) for i, t in enumerate(accepted)]

    def _logprobs(self, rows: np.ndarray, tokens: Sequence[int]) -> list[TokenLogprob | None]:
        """Per token, its log-probability from the raw target row that chose it (rows[i] for
        tokens[i]), with the alternatives asked for; all None when none are asked for."""
        n_top = self.settings.logprobs
        if n_top is None:
            return [None] * len(tokens)
        token_bytes, n_vocab = self._engine.target.token_bytes, self._processor.n_vocab
        out: list[TokenLogprob | None] = []
        for row, token in zip(rows, tokens, strict=False):
            logprob, top = log_softmax_top(row[:n_vocab], token, n_top)
            alternatives = tuple(TokenLogprob(t, token_bytes(t), lp) for t, lp in top)
            out.append(TokenLogprob(token, token_bytes(token), logprob, alternatives))
        return out

    def _draft(self, k: int) -> tuple[int, Draft]:
        """This step's draft of at most k tokens: the tokens a grammar forces (free), then the
        drafter's after them, cut at the first token the grammar forbids. Returns how many of the
        draft's tokens were forced, and the draft."""
        drafter, constraint, sampler = self._engine.drafter, self._constraint, self._draft_sampler
        forced = constraint.forced(k) if constraint is not None else []
        if constraint is not None:
            forced = forced[: constraint.valid_prefix(forced)]  # the canonical spelling may not be allowed
            constraint.consume(forced)
        proposal = NO_DRAFT
        if sampler is not None:
            sampler.reset()
        if drafter is not None and k > len(forced):
            t0 = time.perf_counter()
            proposal = drafter.propose([*self._context, *forced], k - len(forced), sampler)
            self.stats.t_draft += time.perf_counter() - t0
        tokens = proposal.tokens[: k - len(forced)]
        if constraint is not None:
            # A model drafter sampled under the mask (its picks advanced the matcher); an n-gram
            # copy did not, and is cut where the grammar stops allowing it.
            constraint.rollback(sampler.picked if sampler is not None else 0)
            tokens = tokens[: constraint.valid_prefix(tokens)]
            constraint.rollback(len(forced))
        if not forced:
            return 0, Draft(tokens, proposal.q)
        # A forced token is a point proposal: its q is one-hot.
        q = None if proposal.q is None else [Dist.one_hot(t) for t in forced] + list(proposal.q)
        return len(forced), Draft(forced + tokens, None if q is None else q[: len(forced) + len(tokens)])

    def _recents(self, draft: Sequence[int]) -> list[list[int]]:
        """The tokens before each verified position, for the penalties."""
        window = self._processor.window
        if not window:
            return [[]] * (len(draft) + 1)
        tail = self._context[-window:]
        return [tail + list(draft[:i]) for i in range(len(draft) + 1)]


Verifier = Callable[
    [Sequence[int], Sequence[Dist] | None, np.ndarray, list[list[int]], Masks], tuple[int, int]
]


def make_verifier(
    sampling: SamplingSettings, processor: LogitsProcessor, rng: np.random.Generator
) -> Verifier:
    """The acceptance rule for these settings, as one function (draft, q, p_logits, recents,
    masks) → (n_accepted, next_token): greedy, speculative sampling, or exact-match acceptance.
    masks (None: no grammar) holds, per row, what the grammar allows there."""
    if sampling.greedy:

        def greedy(
            draft: Sequence[int],
            q: Sequence[Dist] | None,
            p_logits: np.ndarray,
            recents: list[list[int]],
            masks: Masks,
        ) -> tuple[int, int]:
            if masks is None:
                # bias and penalties move the argmax (adjusted is a view when there are none)
                return verify_greedy(draft, processor.adjusted(p_logits, recents))
            # a row's mask is computed only once verification reaches it
            return verify_greedy_by(
                draft, lambda i: int(processor.argmax(p_logits[i : i + 1], recents[i : i + 1], [masks[i]])[0])
            )

        return greedy

    def sample(
        draft: Sequence[int],
        q: Sequence[Dist] | None,
        p_logits: np.ndarray,
        recents: list[list[int]],
        masks: Masks,
    ) -> tuple[int, int]:
        # p: the target's distributions for every draft position and the one after
        p = LazyDists(processor, p_logits, recents, masks)
        uniforms = rng.random(len(draft) + 1)
        if sampling.accept == "exact":
            return verify_exact_match(draft, p, uniforms)
        if q is not None and len(q) < len(draft):
            raise RuntimeError(f"a drafter gave {len(draft)} tokens but {len(q)} distributions")
        # q None: point proposals (n-gram, a greedy draft), one-hot
        return verify_rejection(draft, None if q is None else q[: len(draft)], p, uniforms, processor.n_vocab)

    return sample


class SpeculativeEngine:
    """A target runtime and an optional drafter.

    Args:
        target: the model whose output is reproduced exactly.
        drafter: proposes tokens; None means plain target-only decoding.
    """

    def __init__(self, target: Runtime, drafter: Drafter | None = None) -> None:
        self.target = target
        self.drafter = drafter

    def forget(self) -> None:
        """Empty the caches, so the next generation evaluates its whole prompt."""
        self.target.truncate(0)
        if self.drafter is not None:
            self.drafter.forget()

    def generate(self, prompt: Sequence[int], settings: GenerationSettings | None = None) -> Generation:
        """Start generating after `prompt` (token ids). Nothing runs until the result is iterated.

        Raises:
            PromptError: the prompt is empty or leaves no room in the context.
        """
        settings = settings or GenerationSettings()
        if not prompt:
            raise PromptError("the prompt is empty")
        if len(prompt) >= self.target.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.target.n_ctx}; "
                "shorten it or raise the context size (--ctx)"
            )
        return Generation(self, prompt, settings)
