"""`edgespec chat`: driven through a pseudo-terminal with pexpect, and with piped input through CliRunner."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgespec.cli.chat import INTERRUPT_HINT, ctrl_c_cancels, history_path, line_editing
from edgespec.cli.main import cli

from ..conftest import tiny_model_args
from ..tinymodels import build_tiny_model, default_vocab

try:
    import pexpect
except ImportError:  # no pseudo-terminals (Windows)
    pexpect = None

needs_pty = pytest.mark.skipif(pexpect is None, reason="pexpect is not available here")

PROMPT = ">>> "
SUMMARY = re.compile(
    r"\[(stopped, )?(\d+) tokens, [\d.]+ tokens/s, [\d.]+ tokens per target pass, "
    r"prompt (\d+) tokens \((\d+) reused\)\]"
)


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own user config folder (where the chat history goes)."""
    folder = tmp_path / "config"
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(folder))
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    return folder


def chat_args(tiny_pair, ctx: int = 256, max_tokens: int = 24, *extra: str) -> list[str]:
    return ["chat", *tiny_model_args(tiny_pair, ctx), "--max-tokens", str(max_tokens), *extra]


def run_answer(tiny_pair, prompt: str, max_tokens: int = 24) -> str:
    """What `edgespec run` answers to `prompt` with the same flags: the real output to compare with."""
    result = CliRunner().invoke(
        cli, ["run", *tiny_model_args(tiny_pair), "--max-tokens", str(max_tokens), prompt]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    return result.stdout.rstrip("\n")


# -- through a pseudo-terminal ----------------------------------------------------------------


def spawn_chat(args: list[str]) -> pexpect.spawn:
    """The chat in a pseudo-terminal (readline on, as for a person), at its first prompt."""
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "edgespec", *args],
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(50, 2000),
    )
    child.expect_exact(PROMPT)
    return child


@needs_pty
def test_chat_in_a_terminal(tiny_pair, config_dir):
    expected = run_answer(tiny_pair, "the cat sat")
    child = spawn_chat(chat_args(tiny_pair))

    child.sendline("the cat sat")
    child.expect(SUMMARY)
    first, summary = child.before.replace("\r\n", "\n"), child.match
    assert expected in first  # the real greedy answer, streamed
    assert summary.group(2) == "24" and summary.group(4) == "0"
    child.expect_exact(PROMPT)

    child.sendline("and then?")
    child.expect(SUMMARY)
    second, summary = child.before.replace("\r\n", "\n").split("and then?\n", 1)[1], child.match
    assert second.strip() and expected not in second
    assert int(summary.group(4)) > 0  # the first turn came from the cache
    child.expect_exact(PROMPT)

    child.sendline("/stats")
    child.expect(r"session: 2 turns, 48 tokens, .*reused from the cache\)")
    child.expect_exact("last answer: [draft draft.gguf] 24 tokens")
    child.expect_exact(PROMPT)
    child.sendline("/system be brief")
    child.expect_exact("system message set")
    child.sendline("/system")
    child.expect_exact("system message: be brief")
    child.sendline("/reset")
    child.expect_exact("conversation forgotten (system message kept)")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    history = history_path().read_text(encoding="utf-8")  # EDGESPEC_CONFIG_DIR is the tmp folder
    assert history_path().parent == config_dir
    assert "the cat sat" in history and "/system be brief" in history


@needs_pty
def test_ctrl_c_stops_the_answer_not_the_chat(tiny_pair):
    child = spawn_chat(chat_args(tiny_pair, ctx=4096, max_tokens=4000))
    child.sendintr()  # at the prompt: clears the line, does not exit
    child.expect_exact(INTERRUPT_HINT)
    child.expect_exact(PROMPT)

    child.sendline("the cat sat")
    child.expect_exact("the cat sat")  # the terminal's echo
    child.expect(r"\w")  # the answer has started
    child.sendintr()
    child.expect(SUMMARY)
    summary = child.match
    assert summary.group(1) == "stopped, "
    first_prompt = int(summary.group(3))
    assert 0 < int(summary.group(2)) < 4000
    child.expect_exact(PROMPT)

    child.sendline("go on")  # a following turn works; the stopped answer is in the conversation
    child.expect_exact("go on")
    child.expect(r"\w")
    child.sendintr()
    child.expect(SUMMARY)
    summary = child.match
    assert summary.group(1) == "stopped, "
    assert (
        int(summary.group(4)) > first_prompt
    )  # reused: the first prompt and the start of the partial answer
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- piped input --------------------------------------------------------------------------------


def test_piped_conversation_and_commands(tiny_pair):
    expected = run_answer(tiny_pair, "the cat sat")
    slash = run_answer(tiny_pair, "/slash")
    script = "/stats\nthe cat sat\n\n/foo\n/system\n/help\n/reset\n//slash\n/stats\n/exit\nnot read\n"
    result = CliRunner().invoke(cli, chat_args(tiny_pair), input=script)
    assert result.exit_code == 0, result.output
    # stdout holds just the answers: no prompt, and the line after /exit is never read
    assert result.stdout == f"{expected}\n{slash}\n"
    err = result.stderr
    assert "no answers yet" in err and "unknown command /foo; /help lists the commands" in err
    assert "no system message" in err and "/reset " in err and "conversation forgotten\n" in err
    assert len(SUMMARY.findall(err)) == 2 and "session: 2 turns, 48 tokens" in err
    assert not history_path().exists()  # history is kept for terminals only


def test_system_message(tiny_pair):
    with_system = CliRunner().invoke(
        cli, chat_args(tiny_pair, 256, 24, "--system", "be brief"), input="/system\nthe cat sat\n"
    )
    assert with_system.exit_code == 0, with_system.output
    assert "system message: be brief" in with_system.stderr
    assert with_system.stdout.strip() != run_answer(tiny_pair, "the cat sat")  # the system message was sent

    set_later = CliRunner().invoke(
        cli, chat_args(tiny_pair), input="/system be brief\n/system\n/reset\nthe cat sat\n"
    )
    assert set_later.exit_code == 0, set_later.output
    assert "system message set" in set_later.stderr and "(system message kept)" in set_later.stderr
    assert set_later.stdout == with_system.stdout


def test_a_full_context_is_an_error_the_chat_survives(tiny_pair):
    # 22 prompt tokens + 24 would pass 40: the first answer fills the context, the next turn cannot fit
    result = CliRunner().invoke(
        cli, chat_args(tiny_pair, 40, 24), input="the cat sat\nmore\n/reset\nthe cat sat\n"
    )
    assert result.exit_code == 0, result.output
    assert "the context (40 tokens) is full: /reset starts a new conversation" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert (
        len(errors) == 1
        and "context holds 40" in errors[0]
        and errors[0].endswith("/reset starts a new conversation")
    )
    first, again = result.stdout.splitlines()
    assert first == again  # after /reset, the same answer to the same first message


def test_unusable_templates_fail_at_start(tiny_pair, tmp_path):
    bare = build_tiny_model(tmp_path / "bare.gguf", seed=1, vocab=default_vocab(), chat_template=None)
    result = CliRunner().invoke(cli, ["chat", *tiny_model_args((bare, tiny_pair[1]))], input="hi\n")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "has no chat template" in result.stderr

    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    strict = build_tiny_model(
        tmp_path / "strict.gguf", seed=1, vocab=default_vocab(), chat_template=no_system
    )
    args = ["chat", *tiny_model_args((strict, tiny_pair[1])), "--system", "x"]
    result = CliRunner().invoke(cli, args, input="hi\n")
    assert result.exit_code == 1 and "refused the conversation: no system" in result.stderr


# -- pieces -------------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self) -> None:
        self.cancels = 0

    def cancel(self) -> bool:
        self.cancels += 1
        return True


def test_ctrl_c_while_generating_cancels_and_the_handler_comes_back():
    engine = FakeEngine()
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_cancels(engine) as pressed:  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGINT)
        assert pressed.wait(5)
    assert pressed.is_set() and engine.cancels == 1
    assert signal.getsignal(signal.SIGINT) is before


def test_history_lives_in_the_config_folder(config_dir):
    assert history_path() == config_dir / "chat_history"


def test_no_readline_is_said(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "readline", None)  # import readline → ImportError
    with line_editing():
        pass
    assert "no line editing or history here" in capsys.readouterr().err
