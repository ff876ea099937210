"""The yardstick: llama.cpp's own plain decoding of the same model, through llama-cpp-python.

What a user compares edgespec with is what they would otherwise run: `llama_cpp.Llama` with its
default context parameters (batches of 512, flash attention off, an F16 cache) and
`create_completion`, greedy. Only the model, the context size and the thread count are set, the
same as edgespec's. Every speed-up edgespec reports is given against this.

Timing: a `stopping_criteria` callback (which llama-cpp-python calls once per generated token and
which never stops anything) stamps the first token as llama.cpp produces it, so the time to the
first token and the decoding rate are measured as edgespec measures its own: tokens after the first
over the time after the first. The tokens are counted as edgespec counts its own, from the
completion's usage (an end-of-generation token is not counted, though its step is timed in both):
llama-cpp-python calls the callback for every sampled token, an end-of-generation token included,
and once more after its loop ends, so counting the calls would credit it one or two tokens more
than it gave.

Threads: llama-cpp-python computes on the thread that calls it, and libgomp keeps an OpenMP team
for every thread that has computed; edgespec's contexts compute on the process's shared CPU thread
(`edgespec.runtimes.native`). Called from the benchmark's own thread, the yardstick would add a
second team in the same process, and with more threads than CPUs libgomp stops spinning at its
barriers: both then ran about 25% slower than each alone (2-core VM, 2026-12-08: 22.9 and 23.0
tokens/s in one process against 30.4 and 29.5 alone, `benchmarks/yardstick_threads.py`). So the yardstick
computes on that same thread, as a process running only llama-cpp-python would on its one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the label of the yardstick in benchmark tables
LABEL = "llama.cpp"


@dataclass
class PlainResult:
    """One completion by llama.cpp's plain decoding.

    Attributes:
        text: the completion's text.
        n_prompt: prompt tokens.
        n_generated: generated tokens, as the usage counts them (an end-of-generation token does
            not count, as in edgespec's `Stats.n_generated`).
        t_first: seconds from the call to the first generated token (prompt processing included).
        t_total: seconds from the call to its return.
        stamps: perf_counter time of each call of llama-cpp-python's stopping criteria.
    """

    text: str
    n_prompt: int
    n_generated: int
    t_first: float
    t_total: float
    stamps: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed: tokens after the first over the time after the first."""
        t = self.t_total - self.t_first
        return (self.n_generated - 1) / t if self.n_generated > 1 and t > 0 else 0.0


class LlamaCppPlain:
    """llama-cpp-python's `Llama` on one GGUF, with its defaults apart from context and threads.

    Args:
        path: the GGUF model (the same file edgespec's target loads).
        n_ctx: context size.
        threads: threads for decoding and for batches (edgespec's target uses the same).
    """

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, threads: int) -> None:
        import llama_cpp

        from edgespec.runtimes.native import cpu_thread

        self.path = Path(path)
        self.threads = threads
        #: where every call into llama.cpp runs (see the module's docstring)
        self.native = cpu_thread()
        self.llm = self.native.call(
            lambda: llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        )

    def complete(
        self,
        prompt: Sequence[int] | str,
        max_tokens: int,
        *,
        reuse: bool = False,
        json_schema: str | None = None,
    ) -> PlainResult:
        """Greedy `create_completion` of `prompt` (token ids, or text as llama-cpp-python takes it).

        Args:
            reuse: keep llama-cpp-python's own prefix cache from the previous call (as its
                chat use does); False evaluates the whole prompt.
            json_schema: constrain the answer with llama-cpp-python's own grammar for this JSON
                schema (`LlamaGrammar.from_json_schema`, llama.cpp's GBNF sampler), as its users
                do; built before the clock starts.
        """
        from llama_cpp import StoppingCriteriaList

        stamps: list[float] = []

        def stamp(_ids: Any, _logits: Any) -> bool:
            stamps.append(time.perf_counter())
            return False

        grammar = None
        if json_schema is not None:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_json_schema(json_schema, verbose=False)
        prompt_arg: Any = list(prompt) if not isinstance(prompt, str) else prompt

        def run() -> tuple[Any, float, float]:
            if not reuse:
                self.llm.reset()
            start = time.perf_counter()
            out = self.llm.create_completion(
                prompt_arg,
                max_tokens=max_tokens,
                temperature=0.0,
                stopping_criteria=StoppingCriteriaList([stamp]),
                grammar=grammar,
            )
            return out, start, time.perf_counter()

        out, start, end = self.native.call(run)
        if not isinstance(out, dict):  # an iterator only when streaming, which is not asked for
            raise TypeError("create_completion streamed an answer that was asked for whole")
        usage = out["usage"]
        return PlainResult(
            text=out["choices"][0]["text"],
            n_prompt=int(usage["prompt_tokens"]),
            n_generated=int(usage["completion_tokens"]),
            t_first=(stamps[0] - start) if stamps else end - start,
            t_total=end - start,
            stamps=stamps,
        )

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> PlainResult:
        """Greedy `create_chat_completion`, streamed, keeping llama-cpp-python's prefix cache
        between turns (what a chat app on it gets). `create_chat_completion` takes no stopping
        criteria, so tokens are stamped as their chunks arrive (one token per chunk, except where
        a character spans tokens)."""
        stamps: list[float] = []
        pieces: list[str] = []

        def run() -> tuple[float, float]:
            start = time.perf_counter()
            for chunk in self.llm.create_chat_completion(
                messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
            ):
                text = chunk["choices"][0]["delta"].get("content")  # type: ignore[index, union-attr]
                if isinstance(text, str) and text:
                    stamps.append(time.perf_counter())
                    pieces.append(text)
            return start, time.perf_counter()

        start, end = self.native.call(run)
        return PlainResult(
            text="".join(pieces),
            n_prompt=int(self.llm.n_tokens),
            n_generated=len(stamps),
            t_first=(stamps[0] - start) if stamps else end - start,
            t_total=end - start,
            stamps=stamps,
        )

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            self.native.call(close)
