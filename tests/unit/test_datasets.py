import pytest

from edgespec.bench.datasets import first_per_category, read_prompts
from edgespec.errors import EdgespecError

from ..conftest import BENCH_QUESTIONS


def test_spec_bench_file_reads_whole():
    prompts = read_prompts(BENCH_QUESTIONS)
    assert len(prompts) == 480
    assert len({p.category for p in prompts}) == 13
    chosen = first_per_category(prompts, per_category=2, categories=4)
    assert len(chosen) == 8 and len({p.category for p in chosen}) == 4


def test_prompt_or_turns_and_clear_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "category": "x"}\n\n{"turns": ["b", "c"], "id": 7}\n')
    first, second = read_prompts(path)
    assert (first.prompt, first.category, second.id, second.turns) == ("a", "x", "7", ("b", "c"))
    path.write_text('{"prompt": "a"}\n{"text": "no prompt here"}\n')
    with pytest.raises(EdgespecError, match=r"p.jsonl:2: not a prompt record"):
        read_prompts(path)
    with pytest.raises(EdgespecError, match="cannot read prompt file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_held_out_and_last_per_category_never_meet_the_first():
    from edgespec.bench.datasets import BenchPrompt, first_per_category, held_out, last_per_category

    prompts = [BenchPrompt(str(i), "ab"[i % 2], (f"q{i}",)) for i in range(12)]  # 6 per category
    first = {p.id for p in first_per_category(prompts, 2)}
    rest = held_out(prompts, 2)
    assert len(rest) == 8 and not first & {p.id for p in rest}
    assert [p.id for p in last_per_category(rest, 1)] == ["10", "11"]
    assert held_out(prompts, 0) == prompts
