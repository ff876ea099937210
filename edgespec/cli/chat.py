"""`edgespec chat`: an interactive chat in the terminal over one loaded engine.

Every line read is a message, or a command starting with "/". Each turn sends the whole
conversation: the engine keeps its caches between calls, so only the tokens after the longest
common prefix with the previous turn are evaluated. At a terminal, lines are read with readline
(editing, and a history kept in the user's config folder); from a pipe, one line is one message.

Ctrl-C while an answer streams asks the engine to stop before its next step (a llama.cpp call is
never interrupted midway); the part of the answer already shown stays in the conversation.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgespec.cli.common import (
    SAMPLING_KEYS,
    SEED,
    engine_options,
    escape_undecodable_stdin,
    format_sources,
    format_stats,
    open_engine,
    sampling_options,
    sampling_settings,
)
from edgespec.errors import EdgespecError, PromptTooLongError

if TYPE_CHECKING:
    from edgespec.api import Engine, Result
    from edgespec.engine import Stats

PROMPT = ">>> "
HISTORY_FILE = "chat_history"  # in the user's config folder
HISTORY_LENGTH = 1000
INTERRUPT_HINT = "(Ctrl-C clears the line; /exit or Ctrl-D leaves)"
COMMANDS_HELP = """\
/system TEXT   set the system message; the conversation is kept and sent with it from the next answer
/system        show the system message
/reset         forget the conversation (the system message stays)
/stats         session totals and the last answer's statistics
/exit          leave (Ctrl-D at the prompt too)
/help          this list
Ctrl-C stops an answer; what was shown of it stays in the conversation.
A line starting with // is sent as a message starting with /."""


@dataclass
class Totals:
    """What a session's answers added up to (kept across /reset)."""

    turns: int = 0
    tokens: int = 0
    decode_tokens: int = 0  # tokens after each answer's first, as Stats.tokens_per_second counts
    decode_seconds: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    prompt: int = 0
    prompt_reused: int = 0

    def add(self, stats: Stats) -> None:
        self.turns += 1
        self.tokens += stats.n_generated
        self.decode_tokens += max(stats.n_generated - 1, 0)
        self.decode_seconds += stats.t_decode
        self.steps += stats.n_steps
        self.drafted += stats.n_drafted
        self.accepted += stats.n_accepted
        self.prompt += stats.n_prompt
        self.prompt_reused += stats.n_prompt_cached

    def line(self) -> str:
        speed = self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
        per_step = (self.steps + self.accepted) / self.steps if self.steps else 0.0
        line = (
            f"session: {self.turns} turn{'' if self.turns == 1 else 's'}, {self.tokens} tokens, "
            f"{speed:.1f} tokens/s, {per_step:.2f} tokens per target pass"
        )
        if self.drafted:
            line += (
                f", acceptance {self.accepted / self.drafted:.1%} ({self.accepted}/{self.drafted} drafted)"
            )
        return line + f", prompt {self.prompt} tokens ({self.prompt_reused} reused from the cache)"


def summary(result: Result) -> str:
    """The one line shown after an answer."""
    stats = result.stats
    parts = [
        f"{stats.n_generated} tokens",
        f"{stats.tokens_per_second:.1f} tokens/s",
        f"{stats.tokens_per_step:.2f} tokens per target pass",
        f"prompt {stats.n_prompt} tokens ({stats.n_prompt_cached} reused)",
    ]
    if result.finish_reason == "cancelled":
        parts.insert(0, "stopped")
    return "[" + ", ".join(parts) + "]"


@contextmanager
def ctrl_c_cancels(engine: Engine) -> Iterator[threading.Event]:
    """While generating, Ctrl-C sets the yielded event and asks the engine to stop before its next
    step, instead of raising KeyboardInterrupt somewhere inside the generation; the previous SIGINT
    handler is restored afterwards. The caller cancels a stream started after the event was set."""
    pressed = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        pressed.set()
        engine.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def history_path() -> Path:
    """The chat history file, in the user's config folder: $EDGESPEC_CONFIG_DIR, else the
    platform's (the folder that holds user profiles)."""
    from edgespec.fileio import user_config_dir

    return user_config_dir() / HISTORY_FILE


@contextmanager
def line_editing() -> Iterator[None]:
    """readline's editing for input(), with the history read from and saved to `history_path()`;
    a one-line note where Python has no readline module."""
    try:
        import readline
    except ImportError:
        readline = None  # type: ignore[assignment]  # Windows: no readline module
    if readline is None:
        click.echo("note: no line editing or history here (Python has no readline module)", err=True)
        yield
        return
    path = history_path()
    readline.set_history_length(HISTORY_LENGTH)
    if path.is_file():
        try:
            readline.read_history_file(path)
        except OSError as exc:
            click.echo(f"note: could not read the chat history {path}: {exc}", err=True)
    try:
        yield
    finally:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
            os.chmod(path, 0o600)  # it holds conversations
        except OSError as exc:
            click.echo(f"note: could not save the chat history to {path}: {exc}", err=True)


def read_line(prompt: str) -> str | None:
    """The next line typed or piped in; None at end of input. Ctrl-C discards the line."""
    while True:
        try:
            return input(prompt)
        except EOFError:
            if prompt:
                click.echo()  # end the prompt's line
            return None
        except KeyboardInterrupt:
            click.echo("\n" + INTERRUPT_HINT, err=True)


@dataclass
class ChatSession:
    """One conversation with an engine, and the statistics of its answers.

    Attributes:
        engine: the loaded engine.
        options: `Engine.chat` options for every answer (max_tokens, seed, sampling).
        system: the system message, or None.
        turns: the user's messages and the answers, alternating.
    """

    engine: Engine
    options: dict[str, Any]
    system: str | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    last: Result | None = None
    #: tools the model may call (OpenAI's format); their results are asked of the user
    tools: list[dict[str, Any]] | None = None
    prompt: str = ""

    def messages(self, user: str | None = None) -> list[dict[str, Any]]:
        """The conversation to send: system message, turns, and the new user message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.turns + tail

    def run(self, prompt: str) -> None:
        """Read lines until end of input or /exit."""
        self.prompt = prompt
        while True:
            line = read_line(prompt)
            if line is None or not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """Answer a message or run a command; False to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        self.answer(text[1:] if text.startswith("//") else text)
        return True

    def command(self, text: str) -> bool:
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            click.echo(COMMANDS_HELP, err=True)
        elif name == "/reset":
            self.turns.clear()
            click.echo("conversation forgotten" + (" (system message kept)" if self.system else ""), err=True)
        elif name == "/system" and argument:
            self.system = argument
            click.echo("system message set", err=True)
        elif name == "/system":
            click.echo(f"system message: {self.system}" if self.system else "no system message", err=True)
        elif name == "/stats":
            self.show_stats()
        else:
            click.echo(f"unknown command {name}; /help lists the commands", err=True)
        return True

    def show_stats(self) -> None:
        if self.last is None:
            click.echo("no answers yet", err=True)
            return
        click.echo(self.totals.line(), err=True)
        click.echo("last answer: " + format_stats(self.last.stats, self.engine.draft_label), err=True)
        if self.last.sources is not None:
            click.echo(format_sources(self.last.sources), err=True)

    def answer(self, text: str) -> None:
        """Stream the answer to `text`; on an error, say so and forget the message. An answer
        that calls tools shows the calls, asks for each one's result, and goes on from them."""
        pending: list[dict[str, Any]] = [{"role": "user", "content": text}]
        while True:
            try:
                result = self.generate(self.messages() + pending)
            except PromptTooLongError as exc:
                click.echo(f"error: {exc}; /reset starts a new conversation", err=True)
                return
            except EdgespecError as exc:
                click.echo(f"error: {exc}", err=True)
                return
            if not result.tool_calls:
                break
            calls = [call.to_openai() for call in result.tool_calls]
            pending.append({"role": "assistant", "content": result.content, "tool_calls": calls})
            for call in result.tool_calls:
                shown = json.dumps(dict(call.arguments), ensure_ascii=False)
                click.echo(click.style(f"→ {call.name}({shown})", fg="cyan"), err=True)
                output = read_line(f"result of {call.name}> " if self.prompt else "")
                if output is None:  # end of input: the call stays unanswered, the turn is dropped
                    return
                pending.append({"role": "tool", "tool_call_id": call.id, "content": output})
        self.turns += [*pending, {"role": "assistant", "content": result.text}]
        self.totals.add(result.stats)
        self.last = result
        click.echo(click.style(summary(result), dim=True), err=True)
        stats = result.stats
        if result.finish_reason == "length" and stats.n_prompt + stats.n_generated >= self.engine.n_ctx:
            click.echo(
                f"the context ({self.engine.n_ctx} tokens) is full: /reset starts a new conversation "
                "(or restart with a larger --ctx)",
                err=True,
            )

    def generate(self, messages: list[dict[str, str]]) -> Result:
        """Stream an answer to stdout; Ctrl-C stops it early. Returns the result, whose text is
        what was shown."""
        out = sys.stdout
        shown = ""
        text = ""
        with (
            ctrl_c_cancels(self.engine) as pressed,
            self.engine.chat(messages, stream=True, tools=self.tools, **self.options) as stream,
        ):
            if pressed.is_set():  # Ctrl-C came before the generation existed
                stream.cancel()
            for chunk in stream:
                text += chunk.text
                # with tools, a call's text is held back: it is shown once parsed
                visible = text[: stream.visible(text)]
                if len(visible) > len(shown):
                    out.write(visible[len(shown) :])
                    out.flush()
                    shown = visible
        result = stream.result
        assert result is not None
        rest = (result.content or "") if result.tool_calls else result.text
        if len(rest) > len(shown):
            out.write(rest[len(shown) :])
            shown = rest
        if not shown.endswith("\n"):
            out.write("\n")
        out.flush()
        return result


@click.command()
@engine_options
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Most tokens per answer.",
)
@sampling_options
@click.option(
    "--seed",
    type=SEED,
    default=None,
    help="Sampling seed for every answer (default: a fresh one each time).",
)
@click.option("--system", default=None, help="Initial system message (/system changes it).")
@click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A JSON file of tools (OpenAI's format) the model may call; you give each call's result.",
)
@click.pass_context
def chat(
    click_ctx: click.Context,
    max_tokens: int,
    seed: int | None,
    system: str | None,
    tools_file: str | None,
    **flags: Any,
) -> None:
    """Chat with the model in the terminal; answers stream as tokens are accepted.

    Each line is a message. Commands: /system TEXT (set the system message; /system alone shows
    it), /reset (forget the conversation, keep the system message), /stats (session totals and
    the last answer's), /help, /exit (or Ctrl-D). Ctrl-C stops an answer and keeps what was shown
    of it; at the prompt it clears the line. Line history is saved in the user's config folder
    ($EDGESPEC_CONFIG_DIR, else e.g. ~/.config/edgespec). Lines can also be piped in.

    \b
    Examples:
      edgespec chat
      edgespec chat --system "You are a terse senior Python reviewer." --max-tokens 512
      edgespec chat --draft ngram --temperature 0.7 --seed 1
      printf 'Hi!\\nName three sorting algorithms.\\n' | edgespec chat --max-tokens 64
      edgespec chat --tools tools.json       # calls are shown; you type each result
    """
    tools = read_tools_file(tools_file) if tools_file else None
    sampling = sampling_settings(flags)
    options = {
        "max_tokens": max_tokens,
        "seed": seed,
        **{key: getattr(sampling, key) for key in SAMPLING_KEYS},
    }
    interactive = sys.stdin is not None and sys.stdin.isatty()
    escape_undecodable_stdin()  # a line that is not UTF-8 is refused by itself; the chat goes on
    with open_engine(click_ctx, flags) as engine:
        session = ChatSession(engine, options, system or None, tools=tools)
        engine.chat_tokens(session.messages("Hi!"))  # no chat template, or one refusing --system: fail now
        if not interactive:
            session.run("")
            return
        with line_editing():
            click.echo(
                f"chatting with {engine.model} ({engine.draft_label}); /help lists the commands, "
                "/exit or Ctrl-D leaves",
                err=True,
            )
            session.run(PROMPT)


def read_tools_file(path: str) -> list[dict[str, Any]]:
    """The tools in a JSON file: a list in OpenAI's format (checked before any model loads)."""
    from edgespec.tools import read_tools

    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}", param_hint="--tools") from None
    except ValueError as e:
        raise click.BadParameter(f"{path} is not JSON: {e}", param_hint="--tools") from None
    try:
        read_tools(tools)
    except EdgespecError as e:
        raise click.BadParameter(str(e), param_hint="--tools") from None
    return list(tools)
