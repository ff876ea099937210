"""The constraint engine, chosen by measuring: llguidance against xgrammar on the default target's
151,936-token vocabulary.

    python benchmarks/constraint_engines.py --out benchmarks/results/constraint_engines.json

For each schema of `benchmarks/prompts/structured.jsonl`:
- compile time: from the JSON schema text to a matcher at its start, nothing cached;
- mask time per token: the full-vocabulary mask at every position of a valid answer (the answer
  edgespec's constrained decoding gave in `benchmarks/results/structured.json`, tokenized
  canonically), advancing the matcher token by token; the answer's last token included.
Plus the one-time cost of reading the vocabulary, and what each engine supports, each checked by
calling it: JSON Schema, regular expressions, a context-free grammar, rolling back N tokens, and
forced ("fast-forward") tokens. xgrammar is measured when it is installed (it needs torch and
transformers, so edgespec does not depend on it); it runs on the CPU here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json  # noqa: E402

PROMPTS = ROOT / "benchmarks" / "prompts" / "structured.jsonl"
ANSWERS = ROOT / "benchmarks" / "results" / "structured.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(
    name: str, setup: float, compiles: list[float], masks: list[float], support: dict[str, bool]
) -> dict:
    return {
        "engine": name,
        "vocabulary_setup_s": setup,
        "compile_ms_median": 1000 * statistics.median(compiles),
        "compile_ms_max": 1000 * max(compiles),
        "mask_ms_median": 1000 * statistics.median(masks),
        "mask_ms_p95": 1000 * percentile(masks, 0.95),
        "mask_ms_max": 1000 * max(masks),
        "mask_ms_mean": 1000 * statistics.mean(masks),
        "tokens_masked": len(masks),
        "support": support,
    }


def run_llguidance(runtime: Any, cases: list[tuple[dict, list[int]]], n_vocab: int) -> dict:
    import llguidance
    import numpy as np

    from edgespec import constrain

    t0 = time.perf_counter()
    tokenizer = constrain.tokenizer_for(runtime)
    setup = time.perf_counter() - t0
    bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
    compiles, masks = [], []
    for schema, tokens in cases:
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=constrain.JSON_STYLE
        )
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        compiles.append(time.perf_counter() - t0)
        assert not matcher.is_error(), matcher.get_error()
        for token in tokens:
            t0 = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            masks.append(time.perf_counter() - t0)
            assert matcher.consume_token(token), matcher.get_error()
    probe = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_regex(r"ab[0-9]+"), log_level=0)
    lark = llguidance.LLMatcher(
        tokenizer, llguidance.LLMatcher.grammar_from_lark('start: "(" start ")" | "x"'), log_level=0
    )
    first = tokenizer.tokenize_str("ab1")
    support = {
        "json_schema": True,
        "regex": not probe.is_error(),
        "context_free_grammar": not lark.is_error(),
        "rollback": probe.consume_tokens(first) and probe.rollback(len(first)),
        "forced_tokens": len(probe.compute_ff_tokens()) > 0,
    }
    return summary("llguidance", setup, compiles, masks, support)


def run_xgrammar(runtime: Any, cases: list[tuple[dict, list[int]]], n_vocab: int) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    t0 = time.perf_counter()
    vocab = [runtime.token_text(t).decode("utf-8", "replace") for t in range(n_vocab)]
    info = xgr.TokenizerInfo(
        vocab,
        vocab_type=xgr.VocabType.BYTE_LEVEL,
        vocab_size=n_vocab,
        stop_token_ids=sorted(runtime.vocab.eog),
    )
    setup = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, n_vocab)
    compiles, masks = [], []
    for schema, tokens in cases:
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        matcher = xgr.GrammarMatcher(compiled)
        compiles.append(time.perf_counter() - t0)
        for token in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(time.perf_counter() - t0)
            if not matcher.accept_token(token):
                raise RuntimeError(f"xgrammar refused token {token} of a valid answer")
    compiler = xgr.GrammarCompiler(info)
    regex = xgr.GrammarMatcher(compiler.compile_regex(r"ab[0-9]+"))
    cfg = compiler.compile_grammar('root ::= "(" root ")" | "x"')
    accepted = regex.accept_string("ab1")
    support = {
        "json_schema": True,
        "regex": accepted,
        "context_free_grammar": cfg is not None,
        "rollback": hasattr(regex, "rollback"),
        "forced_tokens": False,  # find_jump_forward_string gives bytes, not tokens
        "jump_forward_bytes": hasattr(regex, "find_jump_forward_string"),
    }
    return summary("xgrammar", setup, compiles, masks, support)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec import constrain
    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    prompts = {p["id"]: p for p in map(json.loads, PROMPTS.read_text().splitlines()) if p}
    answers = json.loads(ANSWERS.read_text())["records"]
    runtime = LlamaCppRuntime(models.resolve(models.TARGET), RuntimeSettings(n_ctx=256, n_threads=1))
    n_vocab = runtime.vocab.n_vocab
    tokenizer = constrain.tokenizer_for(runtime)
    cases = []
    for record in answers:
        if record["config"] == "edgespec constrained" and record["valid"]:
            tokens = tokenizer.tokenize_str(record["text"])
            cases.append((prompts[record["prompt_id"]]["schema"], tokens))
    constrain._TOKENIZERS.clear()  # llguidance's vocabulary setup is timed from scratch
    rows = [run_llguidance(runtime, cases, n_vocab)]
    xgrammar = run_xgrammar(runtime, cases, n_vocab)
    rows.append(xgrammar or {"engine": "xgrammar", "skipped": "not installed"})
    print(f"{len(cases)} schemas, {sum(len(t) for _, t in cases)} answer tokens, vocabulary {n_vocab}")
    for row in rows:
        print(json.dumps(row))
    if args.out:
        write_json(args.out, {"machine": machine(), "n_vocab": n_vocab, "schemas": len(cases), "rows": rows})


if __name__ == "__main__":
    main()
