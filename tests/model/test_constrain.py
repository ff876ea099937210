"""Constrained decoding on tiny models: the grammar's matcher, forced drafts, cut drafts, and
speculative output token-identical to constrained target-only output."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from edgespec.constrain import Constraint, Grammar, tokenizer_for
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.errors import SettingsError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "size": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["cat", "dog", "the"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "size", "tags", "ok"],
    "additionalProperties": False,
}
GRAMMARS = {
    "schema": Grammar.json_schema(SCHEMA),
    "regex": Grammar.regex(r"(the|a) (cat|dog) [a-z]{2,8}\."),
    "lark": Grammar.lark(
        'start: "[" item ("," item)* "]"\nitem: /[a-z]{1,5}/ | NUMBER\nNUMBER: /[0-9]{1,3}/\n'
    ),
}
PROMPTS = ["the cat sat on the", "a b c a b c a b"]


def pieces(target, text):
    """Token ids for text in the middle of an output (no SentencePiece space before it)."""
    return tokenizer_for(target).tokenize_str(text)


def prompt_ids(target, text):
    return target.tokenize(text, add_special=True, parse_special=False)


def generate(target, drafter, prompt, grammar, k, n=48):
    engine = SpeculativeEngine(target, drafter)
    return engine.generate(prompt, GenerationSettings(max_tokens=n, draft_max=k, grammar=grammar)).run()


def test_constraint_rolls_back_to_the_same_masks(tiny_runtimes):
    target, _ = tiny_runtimes
    constraint = Constraint(GRAMMARS["schema"], target)
    text = '{"name": "ab", "size": 12, "tags": ["cat"], "ok": true}'
    tokens = pieces(target, text)
    assert constraint.valid_prefix(tokens) == len(tokens)
    masks = []
    for token in tokens:
        masks.append(constraint.allowed())
        assert masks[-1][token]
        constraint.consume([token])
    assert constraint.accepting and constraint.depth == len(tokens)
    # Complete: only end-of-generation tokens remain.
    assert set(np.flatnonzero(constraint.allowed())) <= set(target.vocab.eog)
    constraint.rollback(len(tokens) - 3)
    assert np.array_equal(constraint.allowed(), masks[3]) and not constraint.accepting
    constraint.rollback(3)
    assert np.array_equal(constraint.allowed(), masks[0])
    with pytest.raises(Exception, match="cannot undo"):
        constraint.rollback(1)


def test_drafts_are_cut_at_the_first_forbidden_token(tiny_runtimes):
    target, _ = tiny_runtimes
    constraint = Constraint(GRAMMARS["regex"], target)
    good = pieces(target, "the cat")
    bad = pieces(target, "the cow")
    assert constraint.valid_prefix(good) == len(good)
    n = constraint.valid_prefix(bad)
    assert 0 < n < len(bad)
    assert constraint.depth == 0  # checking changed nothing
    # An end token is valid only where the output is complete.
    end = min(target.vocab.eog)
    assert constraint.valid_prefix([*good, end]) == len(good)
    full = pieces(target, "the cat sat.")
    assert constraint.valid_prefix([*full, end, 300, 301]) == len(full) + 3  # after the end: unchecked


def test_forced_tokens_spell_what_the_grammar_allows(tiny_runtimes):
    target, _ = tiny_runtimes
    constraint = Constraint(Grammar.lark('start: "ok=" /[a-z]+/\n'), target)
    forced = constraint.forced(8)
    assert b"".join(target.token_bytes(t) for t in forced) == b"ok="
    assert constraint.forced(1) == forced[:1]


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_constrained_speculation_equals_constrained_target_only(tiny_runtimes, name):
    target, draft_rt = tiny_runtimes
    grammar = GRAMMARS[name]
    for text in PROMPTS:
        prompt = prompt_ids(target, text)
        base = generate(target, None, prompt, grammar, k=0)
        assert base.stats.n_drafted == 0
        for k in (1, 4, 8):
            drafters = [ModelDrafter(draft_rt, max_id=target.vocab.n_vocab), NgramDrafter(), None]
            for drafter in drafters:
                spec = generate(target, drafter, prompt, grammar, k)
                assert spec.tokens == base.tokens, (name, text, k, drafter)
                assert spec.finish_reason == base.finish_reason
        assert_matches(name, base.text, base.finish_reason)


def assert_matches(name, text, finish_reason):
    if finish_reason != "stop":
        return
    if name == "schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif name == "regex":
        assert re.fullmatch(r"(the|a) (cat|dog) [^\W\d_]{2,8}\.", text), text
    else:
        assert text.startswith("[") and text.endswith("]"), text


def test_forced_tokens_are_free_drafts(tiny_runtimes):
    """With no drafter at all, the tokens a schema forces (keys, quotes, separators) are
    drafted, and the target accepts every one of them."""
    target, _ = tiny_runtimes
    prompt = prompt_ids(target, PROMPTS[0])
    base = generate(target, None, prompt, GRAMMARS["schema"], k=0, n=80)
    spec = generate(target, None, prompt, GRAMMARS["schema"], k=8, n=80)
    assert spec.tokens == base.tokens
    assert spec.stats.n_forced > 10
    assert spec.stats.n_forced_accepted == spec.stats.n_forced == spec.stats.n_accepted
    assert spec.stats.n_steps == base.stats.n_steps - spec.stats.n_forced  # a pass saved per token


def test_a_short_budget_ends_with_length_not_a_broken_claim(tiny_runtimes):
    target, _ = tiny_runtimes
    result = generate(target, None, prompt_ids(target, PROMPTS[0]), GRAMMARS["schema"], k=4, n=5)
    assert result.finish_reason == "length" and len(result.tokens) == 5
    with pytest.raises(ValueError):
        json.loads(result.text)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Grammar.json_schema('{"type": "nonsense"}'), "the JSON schema is not valid: .*nonsense"),
        (lambda: Grammar.json_schema("{not json"), "the JSON schema is not valid JSON"),
        (lambda: Grammar.json_schema([1, 2]), "a JSON schema must be an object"),
        (lambda: Grammar.regex("a(b"), "the regular expression is not valid: .*unclosed group"),
        (lambda: Grammar.lark("start: foo"), "the grammar is not valid: .*unknown name"),
        (lambda: Grammar.gbnf("root ::= foo"), "the grammar is not valid: .*'foo' not found"),
        (lambda: Grammar.regex(""), "must be non-empty text"),
    ],
)
def test_bad_grammars_are_one_line_errors(make, message):
    with pytest.raises(SettingsError, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_gbnf_and_lark_files_are_told_apart():
    assert Grammar.from_text('root ::= "yes" | "no"').kind == "gbnf"
    assert Grammar.from_text('start: "yes" | "no"').kind == "lark"


# -- the Python API ---------------------------------------------------------------------------


@pytest.fixture()
def engine(tiny_pair):
    from edgespec import Engine

    with Engine(tiny_pair[0], tiny_pair[1], n_ctx=256, threads=1, cache_prompt=False) as engine:
        yield engine


def test_engine_takes_each_way_of_asking_for_json(engine):
    results = [
        engine.generate("the cat", raw=True, max_tokens=80, json_schema=SCHEMA),
        engine.generate("the cat", raw=True, max_tokens=80, json_schema=json.dumps(SCHEMA)),
        engine.generate(
            "the cat",
            raw=True,
            max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
        ),
        engine.generate("the cat", raw=True, max_tokens=80, grammar=Grammar.json_schema(SCHEMA)),
    ]
    assert len({tuple(r.tokens) for r in results}) == 1
    assert results[0].stats.n_forced > 0
    assert_matches("schema", results[0].text, results[0].finish_reason)
    anything = engine.generate("the cat", raw=True, max_tokens=60, response_format={"type": "json_object"})
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.text), dict)
    text = engine.generate("the cat", raw=True, max_tokens=20, response_format={"type": "text"})
    assert text.tokens == engine.generate("the cat", raw=True, max_tokens=20).tokens


def test_engine_regex_and_grammar(engine):
    result = engine.generate("the cat", raw=True, max_tokens=30, regex=r"(yes|no), [a-z ]{3,10}\.")
    assert re.fullmatch(r"(yes|no), [a-z ]{3,10}\.", result.text) or result.finish_reason == "length"
    result = engine.chat(
        [{"role": "user", "content": "pick"}], max_tokens=10, grammar='root ::= "red" | "green" | "blue"'
    )
    assert result.text in ("red", "green", "blue") and result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"json_schema": SCHEMA, "regex": "a"}, "give one constraint, not several: got json_schema, regex"),
        ({"response_format": {"type": "xml"}}, "response_format.type must be"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema must be an object"),
        ({"response_format": "json"}, "response_format must be an object"),
        ({"json_schema": {"type": "integer", "minimum": "a"}}, "the JSON schema is not valid"),
        ({"regex": "(("}, "the regular expression is not valid"),
    ],
)
def test_bad_constraints_fail_before_generating(engine, options, message):
    with pytest.raises(SettingsError, match=re.escape(message) if "(" not in message else message):
        engine.generate("the cat", raw=True, **options)
    assert not engine.busy
