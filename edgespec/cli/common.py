"""Command-line pieces shared by `run`, `chat`, `serve`, `bench` and `profile`: progress bars,
sampling flags, the flags that load an engine, and the one-line statistics."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import click

from edgespec.defaults import DRAFT_MAX, K_LIMIT, N_CTX

if TYPE_CHECKING:
    from edgespec.api import Engine
    from edgespec.load.builder import EngineSpec


def progress(model: Any) -> Any:
    return click.progressbar(
        length=model.size, label=f"preparing {model.description} (first use)", file=sys.stderr
    )


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and infinities (click's FloatRange lets nan through every
    bound, since every comparison with nan is false), with an optional range."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class TokenBias(click.ParamType):
    """TOKEN_ID=BIAS → (id, bias): an id of 0 or more, and a finite bias or -inf (which bans)."""

    name = "TOKEN_ID=BIAS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        token, sep, amount = str(value).partition("=")
        try:
            if not sep:
                raise ValueError
            pair = (int(token), float(amount))
        except ValueError:
            self.fail(f"expected TOKEN_ID=BIAS (e.g. 13=-inf), got {value!r}", param, ctx)
        if pair[0] < 0:
            self.fail(f"the token id must be 0 or more, got {value!r}", param, ctx)
        if math.isnan(pair[1]) or pair[1] == math.inf:
            self.fail(f"the bias must be a finite number or -inf (bans the token), got {value!r}", param, ctx)
        return pair


class GrammarOption(click.ParamType):
    """A constraint on the output, checked before any model loads: --json-schema takes a JSON
    schema inline or a file holding one, --regex a regular expression, --grammar a Lark or GBNF
    grammar file. Converts to an `edgespec.Grammar`."""

    #: a schema or grammar file larger than this is surely a mistake
    MAX_BYTES = 1 << 20

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = {"json_schema": "FILE|JSON", "regex": "PATTERN", "grammar": "FILE"}[kind]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from edgespec.constrain import Grammar
        from edgespec.errors import SettingsError

        if isinstance(value, Grammar):
            return value
        text = str(value)
        try:
            if self.kind == "regex":
                return Grammar.regex(text)
            if self.kind == "json_schema":
                inline = text.lstrip().startswith("{")
                return Grammar.json_schema(text if inline else self._read(text, param, ctx))
            return Grammar.from_text(self._read(text, param, ctx))
        except SettingsError as e:
            self.fail(str(e), param, ctx)

    def _read(self, path: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read(self.MAX_BYTES + 1)
        except OSError as e:
            self.fail(f"cannot read {path}: {e.strerror or e}", param, ctx)
        if len(data) > self.MAX_BYTES:
            self.fail(f"{path} is over {self.MAX_BYTES >> 20} MiB: not a schema or grammar", param, ctx)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{path} is not UTF-8 text", param, ctx)


def constraint_options(func: Any) -> Any:
    """--json-schema, --regex and --grammar: what the output must match (at most one)."""
    options = [
        click.option(
            "--json-schema",
            type=GrammarOption("json_schema"),
            default=None,
            help="Answer with JSON valid against this schema (inline JSON or a file).",
        ),
        click.option(
            "--regex",
            type=GrammarOption("regex"),
            default=None,
            help="Answer with text that matches this regular expression whole.",
        ),
        click.option(
            "--grammar",
            type=GrammarOption("grammar"),
            default=None,
            help="Answer with text derived from this grammar file (Lark, or llama.cpp's GBNF).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def one_constraint(json_schema: Any, regex: Any, grammar: Any) -> Any:
    """The one constraint given, or None; a usage error when several are."""
    given = [g for g in (json_schema, regex, grammar) if g is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --json-schema, --regex and --grammar")
    return given[0] if given else None


#: seeds are 64-bit (GenerationSettings)
SEED = click.IntRange(0, 2**64 - 1)


def logit_bias(values: tuple[tuple[int, float], ...]) -> dict[int, float]:
    return dict(values)


def sampling_options(func: Any) -> Any:
    """Sampling flags shared by `run` and `bench`; collected by `_sampling_settings`."""
    options = [
        click.option(
            "--temperature",
            "-t",
            type=FiniteFloat(0, 100),
            default=0.0,
            show_default=True,
            help="0 is greedy decoding; above 0, tokens are sampled.",
        ),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, help="1 = off."),
        click.option("--min-p", type=FiniteFloat(0, 1, max_open=True), default=0.0, help="0 = off."),
        click.option(
            "--repeat-penalty",
            type=FiniteFloat(0, min_open=True),
            default=1.0,
            show_default=True,
            help="1 = off.",
        ),
        click.option("--frequency-penalty", type=FiniteFloat(-10, 10), default=0.0, show_default=True),
        click.option("--presence-penalty", type=FiniteFloat(-10, 10), default=0.0, show_default=True),
        click.option(
            "--penalty-last-n",
            type=click.IntRange(min=0),
            default=64,
            show_default=True,
            help="Latest context tokens the penalties look at.",
        ),
        click.option(
            "--logit-bias",
            multiple=True,
            type=TokenBias(),
            metavar="TOKEN_ID=BIAS",
            help="Add BIAS to a token's logit (repeatable; -inf bans it).",
        ),
        click.option(
            "--accept",
            type=click.Choice(["rejection", "exact"]),
            default="rejection",
            show_default=True,
            help="How drafts are verified when sampling: rejection sampling (keeps more drafts) or "
            "exact match with the target's own sample (llama.cpp's rule, for comparison).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


SAMPLING_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "penalty_last_n",
    "logit_bias",
    "accept",
)


def sampling_settings(kwargs: dict[str, Any]) -> Any:
    """Pop the sampling flags from a command's keyword arguments into SamplingSettings."""
    from edgespec.sampling import SamplingSettings

    values = {key: kwargs.pop(key) for key in SAMPLING_KEYS}
    values["logit_bias"] = logit_bias(values["logit_bias"])
    return SamplingSettings(**values)


def tune_progress(total: int) -> Any:
    return click.progressbar(length=total, label="tuning for this machine", file=sys.stderr)


def format_sources(summary: Any) -> str:
    """One line: how often the goodput controller chose each draft source, and how they fared."""
    parts = []
    for source, entry in summary.items():
        if not entry.steps:
            continue
        if source == "none":
            parts.append(f"plain {entry.steps} steps")
        else:
            rate = entry.accepted / entry.drafted if entry.drafted else 0.0
            parts.append(
                f"{source} {entry.steps} steps ({entry.accepted}/{entry.drafted} accepted, {rate:.0%})"
            )
    return "[controller] " + ", ".join(parts)


def read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if sys.stdin is None or (prompt is None and sys.stdin.isatty()):
        raise click.UsageError("no prompt: give it as an argument or on standard input")
    escape_undecodable_stdin()
    return sys.stdin.read()


def escape_undecodable_stdin() -> None:
    """Read standard input so that bytes which are not UTF-8 arrive as surrogate escapes
    (whatever the locale), instead of a UnicodeDecodeError somewhere in a read. Tokenizing then
    refuses such text with one line naming the byte (`errors.encode_utf8`)."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)  # absent on a replaced, non-text stdin
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def format_stats(stats: Any, drafter: str) -> str:
    line = (
        f"[{drafter}] {stats.n_generated} tokens, {stats.tokens_per_second:.2f} tokens/s "
        f"(prompt {stats.n_prompt} tokens in {stats.t_prompt:.2f} s), "
        f"{stats.tokens_per_step:.2f} tokens per target pass"
    )
    line += f", {stats.guarantee} guarantee"
    if stats.n_drafted:
        line += f", acceptance {stats.acceptance_rate:.1%} ({stats.n_accepted}/{stats.n_drafted} drafted)"
    line += f"; drafting {stats.t_draft:.2f} s, verifying {stats.t_verify:.2f} s"
    return line


def _engine_option_list() -> list[Any]:
    return [
        click.option(
            "--target",
            envvar="EDGESPEC_TARGET",
            default="default",
            show_default=True,
            help="Target GGUF path, or 'default' for Qwen2.5-Coder-1.5B-Instruct Q4_K_M.",
        ),
        click.option(
            "--draft",
            envvar="EDGESPEC_DRAFT",
            default="default",
            show_default=True,
            help="Draft GGUF path, 'default' (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), "
            "'ngram' (prompt lookup, no model) or 'none' (target only).",
        ),
        click.option(
            "--draft-max",
            "-k",
            type=click.IntRange(0, K_LIMIT),
            default=DRAFT_MAX,
            show_default=True,
            help="Most draft tokens per step (k).",
        ),
        click.option(
            "--profile",
            "profile_spec",
            envvar="EDGESPEC_PROFILE",
            default=None,
            help="Placement profile (name or .toml; see `edgespec profile list`), or 'auto': the profile "
            "detected for this machine, tuned on first use. Flags given explicitly override it. Default: "
            "auto, unless --draft or --draft-max is given.",
        ),
        click.option(
            "--threads",
            envvar="EDGESPEC_THREADS",
            type=click.IntRange(min=1),
            default=None,
            help="CPU threads (default: physical cores).",
        ),
        click.option(
            "--draft-threads",
            type=click.IntRange(min=1),
            default=None,
            help="CPU threads for the draft model (default: as the profile says, else --threads).",
        ),
        click.option(
            "--ctx",
            type=click.IntRange(min=8),
            default=N_CTX,
            show_default=True,
            help="Context size in tokens (prompt + answer).",
        ),
        click.option(
            "--gpu-layers",
            type=int,
            default=0,
            show_default=True,
            help="Target layers to offload to a GPU (-1 = all).",
        ),
        click.option(
            "--draft-gpu-layers",
            type=int,
            default=0,
            show_default=True,
            help="Draft layers to offload to a GPU (-1 = all).",
        ),
        click.option(
            "--draft-provider",
            default=None,
            help="ONNX Runtime provider for an ONNX drafter (cuda, dml, coreml, cpu; default: the best "
            "available).",
        ),
        click.option(
            "--flash-attn",
            type=click.Choice(["auto", "on", "off"]),
            default="off",
            show_default=True,
            help="llama.cpp's flash attention, without a profile: off as llama-cpp-python runs it (on "
            "a CPU it made decoding at long contexts slower); exact kernels always run it.",
        ),
        click.option(
            "--kernels",
            type=click.Choice(["exact", "fast"]),
            default="fast",
            show_default=True,
            help="fast: llama.cpp's own kernels, output the target's in distribution (a greedy near-tie "
            "may break otherwise after a verification pass); exact: row-invariant kernels, verified on "
            "this machine, output token-identical to target-only.",
        ),
        click.option("--verbose", "-v", is_flag=True, help="Let llama.cpp's own log lines through."),
    ]


#: the keyword arguments `engine_options` adds to a command (consumed by `open_engine`)
ENGINE_KEYS = (
    "target",
    "draft",
    "draft_max",
    "profile_spec",
    "threads",
    "draft_threads",
    "ctx",
    "gpu_layers",
    "draft_gpu_layers",
    "draft_provider",
    "flash_attn",
    "kernels",
    "verbose",
)


def engine_options(func: Any) -> Any:
    """The flags that choose, place and load the models (`run`, `chat`, `serve`)."""
    for option in reversed(_engine_option_list()):
        func = option(func)
    return func


def open_engine(ctx: click.Context, kwargs: dict[str, Any], **extra: Any) -> Engine:
    """Pop the `engine_options` flags from a command's keyword arguments and load the engine.

    A flag counts as given when it is on the command line or in its environment variable; flags
    left at their defaults leave the choice to the profile (`--profile auto` when neither
    --draft nor --draft-max is given). `extra` goes to `Engine` as it is.
    """
    return engine_from(engine_spec(ctx, kwargs), **extra)


def engine_spec(ctx: click.Context, kwargs: dict[str, Any]) -> EngineSpec:
    """Pop the `engine_options` flags from a command's keyword arguments: the engine they describe
    (see `open_engine`)."""
    from edgespec.load.builder import EngineSpec

    values = {key: kwargs.pop(key) for key in ENGINE_KEYS}

    def given(name: str) -> Any:
        source = ctx.get_parameter_source(name)
        explicit = source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
        return values[name] if explicit else None

    return EngineSpec(
        values["target"],
        given("draft"),
        profile=values["profile_spec"],
        draft_max=given("draft_max"),
        n_ctx=values["ctx"],
        threads=values["threads"],
        draft_threads=values["draft_threads"],
        gpu_layers=given("gpu_layers"),
        draft_gpu_layers=given("draft_gpu_layers"),
        kernels=given("kernels"),
        flash_attn=values["flash_attn"],
        draft_provider=values["draft_provider"],
        verbose=values["verbose"],
    )


def engine_from(spec: EngineSpec, **extra: Any) -> Engine:
    """Load the engine `spec` describes, with the command line's progress bars and notes."""
    from edgespec.api import Engine

    return Engine.from_spec(
        spec,
        progress=progress,
        tune_progress=tune_progress,
        on_note=lambda line: click.echo(line, err=True),
        **extra,
    )
