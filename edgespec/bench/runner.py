"""`edgespec bench`: configurations side by side on the same loaded models, checked for identity.

Fairness rules: every configuration runs on the same runtimes, interleaved prompt by prompt
(A B C, A B C, ...) so drift in the machine's speed hits all alike; every configuration decodes
with the same sampling settings (greedy unless asked) and, per prompt, the same seed; prompts are
formatted the same way; warm-up runs are not counted. With greedy decoding every speculative
configuration's token ids are compared with target-only's for the same prompt and turn, and a
difference is a failure. Sampled outputs differ from run to run by design; that they follow the
target's distribution is what tests/model/test_sampling_stats.py checks.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgespec.bench.datasets import BenchPrompt
from edgespec.chat import chat_tokens
from edgespec.costs import Costs
from edgespec.defaults import DRAFT_MAX, K_LIMIT
from edgespec.drafting import Drafter, ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine, Stats
from edgespec.errors import SettingsError
from edgespec.fileio import write_text_atomic
from edgespec.load.drafters import DraftSetup, make_drafter
from edgespec.sampling import GREEDY, SamplingSettings

if TYPE_CHECKING:
    from edgespec.placement.profiles import Profile
    from edgespec.runtimes.base import Runtime

_CONFIG = re.compile(
    r"^(?P<kind>llama\.cpp|target-only|none|draft|ngram|auto)(?::(?P<params>[a-z_]+=[\w.]+(?:,[a-z_]+=[\w.]+)*))?$"
)


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure.

    Spec syntax: `llama.cpp` (llama.cpp's own plain decoding through llama-cpp-python: the
    yardstick every speed-up is given against when it is in the run), `target-only`, `draft[:k=N]`,
    `ngram[:k=N,n_min=N,n_max=N]` (k defaults to 4),
    `auto[:k=N]` (the tuned `--profile auto`: the goodput controller chooses the drafter and the
    draft length up to k, default the profile's k_max); drafters also take
    `accept=rejection|exact` (how drafts are verified when sampling; default: the bench's
    --accept), `draft` takes `model=NAME`, a draft model named with `--drafter NAME=PATH`
    (default: the --draft model), and `draft` and `auto` take `overlap=0|1` (draft the next block
    while the target verifies; default: off for draft, the profile's for auto).
    """

    label: str
    drafter: str  # "llama.cpp", "none", "draft", "ngram" or "auto"
    k: int = 0
    n_min: int = 2
    n_max: int = 4
    accept: Literal["rejection", "exact"] | None = None
    model: str | None = None
    overlap: bool | None = None

    @classmethod
    def parse(cls, spec: str) -> BenchConfig:
        match = _CONFIG.match(spec.strip())
        if not match:
            raise SettingsError(
                f"unknown configuration {spec!r}; use llama.cpp, target-only, draft[:k=N], "
                "ngram[:k=N,n_min=N,n_max=N] or auto[:k=N]"
            )
        kind = "none" if match["kind"] in ("target-only", "none") else match["kind"]
        if kind == "llama.cpp":
            if match["params"]:
                raise SettingsError(f"configuration {spec!r}: llama.cpp takes no parameters")
            return YARDSTICK
        params = dict(p.split("=") for p in match["params"].split(",")) if match["params"] else {}
        allowed = {
            "none": set(),
            "draft": {"k", "accept", "model", "overlap"},
            "ngram": {"k", "n_min", "n_max", "accept"},
            "auto": {"k", "accept", "overlap"},
        }[kind]
        unknown = set(params) - allowed
        if unknown:
            raise SettingsError(f"configuration {spec!r}: unknown parameter {sorted(unknown)[0]!r}")
        accept = params.pop("accept", None)
        model = params.pop("model", None)
        overlap = params.pop("overlap", None)
        if overlap not in (None, "0", "1"):
            raise SettingsError(f"configuration {spec!r}: overlap must be 0 or 1")
        if accept not in (None, "rejection", "exact"):
            raise SettingsError(f"configuration {spec!r}: accept must be rejection or exact")
        try:
            values: dict[str, Any] = {key: int(value) for key, value in params.items()}
        except ValueError:
            raise SettingsError(f"configuration {spec!r}: k, n_min and n_max take integers") from None
        if accept:
            values["accept"] = accept
        if model:
            values["model"] = model
        if overlap is not None:
            values["overlap"] = overlap == "1"
        k = values.pop("k", {"none": 0, "auto": AUTO_K}.get(kind, DRAFT_MAX))
        if kind != "none" and not 1 <= k <= K_LIMIT:
            raise SettingsError(f"configuration {spec!r}: k must be between 1 and {K_LIMIT}")
        shown = {key: int(value) if isinstance(value, bool) else value for key, value in values.items()}
        label = (
            "target-only"
            if kind == "none"
            else f"{kind} k={k}" + "".join(f" {key}={value}" for key, value in sorted(shown.items()))
        )
        config = cls(label=label, drafter=kind, k=k, **values)  # type: ignore[arg-type]
        if kind == "ngram" and not 1 <= config.n_min <= config.n_max:
            raise SettingsError(f"configuration {spec!r}: need 1 <= n_min <= n_max")
        return config


TARGET_ONLY = BenchConfig(label="target-only", drafter="none")
YARDSTICK = BenchConfig(label="llama.cpp", drafter="llama.cpp")
#: the draft-length cap of an `auto` configuration without k=N (the built-in profiles' k_max)
AUTO_K = K_LIMIT


def read_config_file(path: str | Path) -> list[BenchConfig]:
    """Configurations from TOML: `configs = ["target-only", "draft:k=4", ...]`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from None
    specs = data.get("configs")
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs) or not specs:
        raise SettingsError(f'{path}: expected configs = ["target-only", "draft:k=4", ...]')
    return [BenchConfig.parse(s) for s in specs]


def check_drafter_names(configs: Sequence[BenchConfig], names: Iterable[str]) -> None:
    """Raise unless every `model=NAME` configuration names one of the given draft models."""
    known = set(names)
    for config in configs:
        if config.model is not None and config.model not in known:
            listed = ", ".join(sorted(known)) or "none; add --drafter NAME=PATH"
            raise SettingsError(
                f"configuration {config.label!r}: no drafter named {config.model!r} (known: {listed})"
            )


@dataclass
class BenchResult:
    """Every measurement of one bench run."""

    configs: list[BenchConfig]
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    costs: Costs | None = None
    # target-only's tokens for the first turn of each prompt (first repeat): what peers are compared with
    references: dict[str, list[int]] = field(default_factory=dict)
    sampling: SamplingSettings = GREEDY
    #: whether the target ran under the exact guarantee (then a greedy mismatch is a failure)
    exact: bool = False


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run(
    target: Runtime,
    draft: Runtime | None,
    prompts: Sequence[BenchPrompt],
    configs: Sequence[BenchConfig],
    *,
    max_tokens: int = 128,
    repeat: int = 1,
    warmup: int = 1,
    multi_turn: bool = False,
    sampling: SamplingSettings = GREEDY,
    seed: int = 0,
    on_run: Callable[[], None] | None = None,
    drafts: Mapping[str, Runtime] | None = None,
    auto_profile: Profile | None = None,
) -> BenchResult:
    """Run every configuration on every prompt, interleaved, and compare outputs with target-only.

    Args:
        target, draft: loaded runtimes (draft may be None when no configuration needs it).
        prompts: the prompt set; with `multi_turn`, every turn of a prompt is generated in order,
            each answer (target-only's, which every exact configuration reproduces) becoming
            part of the next turn's conversation.
        configs: configurations; target-only is added when missing (it is the reference the
            speculative configurations are compared with). `llama.cpp` runs llama-cpp-python's
            plain decoding of the target file in the same loop (first each round).
        max_tokens: new tokens per generation.
        repeat: runs per prompt and configuration (interleaved).
        warmup: generations per configuration before measuring (on the first prompt, not counted).
        sampling: sampling settings for every configuration (a configuration's own `accept`
            overrides the acceptance rule); greedy by default.
        seed: base seed; a prompt's generations all use seed + 1000 × prompt index + 100 × repeat
            + turn, whatever the configuration.
        on_run: called after each measured generation (for a progress bar).
        drafts: further draft models by name, for configurations with `model=NAME`.
        auto_profile: the tuned profile `auto` configurations follow (its drafters and costs;
            the models are the ones loaded here).
    """
    configs = list(configs)
    if all(c.drafter != "none" for c in configs):
        configs.insert(0, TARGET_ONLY)
    # the yardstick and the reference run first each round
    configs.sort(key=lambda c: {"llama.cpp": 0, "none": 1}.get(c.drafter, 2))
    exact = target.guarantee == "exact"
    if any(c.drafter == "draft" and c.model is None for c in configs) and draft is None:
        raise SettingsError("a draft configuration needs a draft model")
    if any(c.drafter == "auto" for c in configs) and auto_profile is None:
        raise SettingsError("an auto configuration needs a tuned profile")
    check_drafter_names(configs, drafts or {})
    engines = _engines(target, draft, configs, drafts or {}, auto_profile)
    plain = None
    if any(c.drafter == "llama.cpp" for c in configs):
        from edgespec.bench.yardstick import LlamaCppPlain
        from edgespec.runtimes.llama_cpp import default_threads

        plain = LlamaCppPlain(target.path, target.n_ctx, target.settings.n_threads or default_threads())
    template = target.chat_template()
    if not template:
        raise SettingsError(f"{target.path.name} has no chat template; bench formats prompts with it")

    def generate(config: BenchConfig, messages: list[dict[str, str]], seed: int) -> Any:
        tokens = chat_tokens(target, template, messages)
        mine = replace(sampling, accept=config.accept) if config.accept else sampling
        if config.drafter == "llama.cpp":
            assert plain is not None
            return tokens, _plain_generation(plain, tokens, max_tokens)
        settings = GenerationSettings(max_tokens=max_tokens, draft_max=config.k, seed=seed, sampling=mine)
        engine = engines[config.label]
        engine.forget()  # every configuration pays for the whole prompt, not the previous one's cache
        return tokens, engine.generate(tokens, settings).run()

    result = BenchResult(configs=configs, sampling=sampling, exact=exact)
    if prompts:
        for config in configs:
            for _ in range(warmup):
                generate(config, [{"role": "user", "content": prompts[0].prompt}], seed)

    for index, item in enumerate(prompts):
        turns = item.turns if multi_turn else item.turns[:1]
        for rep in range(repeat):
            conversation: list[dict[str, str]] = []
            for turn_index, turn in enumerate(turns):
                conversation.append({"role": "user", "content": turn})
                reference = None
                yardstick_text = None
                for config in configs:
                    tokens, gen = generate(config, conversation, seed + 1000 * index + 100 * rep + turn_index)
                    if config.drafter == "llama.cpp":
                        yardstick_text = gen.text
                    elif reference is None:
                        reference = gen
                        if rep == 0 and turn_index == 0:
                            result.references[item.id] = list(gen.tokens)
                    # sampled outputs are not comparable token by token
                    identical = None
                    if sampling.greedy and reference is not None:
                        identical = (
                            gen.text == reference.text
                            if gen.tokens is None
                            else gen.tokens == reference.tokens
                        )
                    same_as_plain = gen.text == yardstick_text if yardstick_text is not None else None
                    engine = engines.get(config.label)
                    drafter = engine.drafter if engine is not None else None
                    record = {
                        "prompt_id": item.id,
                        "category": item.category,
                        "turn": turn_index,
                        "repeat": rep,
                        "config": config.label,
                        "k": config.k,
                        "drafter": config.drafter,
                        "prompt_tokens": len(tokens),
                        "finish_reason": gen.finish_reason,
                        "identical_to_target_only": identical,
                        "identical_to_llama_cpp": same_as_plain if sampling.greedy else None,
                    }
                    result.records.append(_record(record, gen, drafter))
                    # Only the exact guarantee promises token-identical output; under llama.cpp's
                    # kernels a near-tie may break otherwise, which the identical rate reports.
                    if identical is False and exact and config.drafter not in ("llama.cpp", "none"):
                        result.failures.append(
                            f"{config.label} differs from target-only on prompt {item.id} turn {turn_index}"
                        )
                    if on_run:
                        on_run()
                assert reference is not None
                conversation.append({"role": "assistant", "content": reference.text})
    if plain is not None:
        plain.close()
    return result


def _engines(
    target: Runtime,
    draft: Runtime | None,
    configs: Sequence[BenchConfig],
    drafts: Mapping[str, Runtime],
    auto_profile: Profile | None,
) -> dict[str, SpeculativeEngine]:
    """One engine per configuration over the one target, its drafter from the registry. Each
    model has one ModelDrafter, shared by its configurations, so that its cache stays true; each
    n-gram setting one NgramDrafter (its index follows the sequence it was shown)."""
    n_vocab = target.vocab.n_vocab
    model_drafter = ModelDrafter(draft, max_id=n_vocab) if draft is not None else None
    named = {name: ModelDrafter(rt, max_id=n_vocab) for name, rt in drafts.items()}
    ngram_drafters: dict[tuple[int, int], NgramDrafter] = {}
    engines: dict[str, SpeculativeEngine] = {}
    for config in configs:
        if config.drafter == "llama.cpp":
            continue
        drafter: Drafter | None
        if config.drafter == "ngram":
            key = (config.n_min, config.n_max)
            if key not in ngram_drafters:
                ngram_drafters[key] = NgramDrafter(n_min=config.n_min, n_max=config.n_max)
            drafter = ngram_drafters[key]
        else:
            model = model_drafter if config.model is None else named[config.model]
            overlap = config.overlap if config.drafter == "auto" else (True if config.overlap else None)
            drafter = make_drafter(config.drafter, DraftSetup(model, auto_profile, overlap=overlap))
        engines[config.label] = SpeculativeEngine(target, drafter)
    return engines


def _record(fields: dict[str, Any], gen: Any, drafter: Drafter | None) -> dict[str, Any]:
    """A result record: what identifies the generation, the process's memory, the drafter's
    per-source statistics (a controlled drafter) and the generation's statistics."""
    summary = drafter.summary() if drafter is not None else None
    sources = {k: asdict(v) for k, v in summary.items()} if summary is not None else None
    return {**fields, "rss_mib": _rss_mib(), "sources": sources, **gen.stats.to_dict()}


@dataclass
class _PlainGeneration:
    """llama.cpp's plain decoding of one prompt, shaped as the bench records a generation."""

    text: str
    finish_reason: str
    stats: Any
    tokens: list[int] | None = None


def _plain_generation(plain: Any, tokens: list[int], max_tokens: int) -> _PlainGeneration:
    res = plain.complete(tokens, max_tokens)
    stats = Stats(
        guarantee="llama.cpp",
        n_prompt=res.n_prompt,
        n_generated=res.n_generated,
        t_prompt=res.t_first,
        t_total=res.t_total,
    )
    return _PlainGeneration(res.text, "stop" if res.n_generated < max_tokens else "length", stats)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(result: BenchResult, category: str | None = None) -> list[dict[str, Any]]:
    """Per-configuration figures, over all prompts or one category.

    tokens/s is first reduced to one median per prompt and turn (over repeats); the speed-up is
    the geometric mean over prompts of that median divided by the yardstick's: llama.cpp's plain
    decoding when it ran (`baseline_label`), else target-only's. `predicted_speedup`
    is what the measured cost curve predicts for the configuration's k at its measured acceptance
    rate, drafting on every step; a drafter that often proposes nothing (n-gram) does better than
    that prediction, since its empty steps cost only T(1).
    """
    rows = [r for r in result.records if category is None or r["category"] == category]

    def per_prompt(label: str, key: str) -> dict[tuple[str, int], float]:
        values: dict[tuple[str, int], list[float]] = {}
        for r in rows:
            if r["config"] == label:
                values.setdefault((r["prompt_id"], r["turn"]), []).append(r[key])
        return {pid: statistics.median(v) for pid, v in values.items()}

    base = per_prompt(baseline_label(result), "tokens_per_second")
    summary = []
    for config in result.configs:
        mine = [r for r in rows if r["config"] == config.label]
        if not mine:
            continue
        tps = per_prompt(config.label, "tokens_per_second")
        ratios = [tps[p] / base[p] for p in tps if base.get(p, 0) > 0 and tps[p] > 0]
        drafted = sum(r["n_drafted"] for r in mine)
        accepted = sum(r["n_accepted"] for r in mine)
        total = sum(r["t_total"] for r in mine)
        draft_s, verify_s = sum(r["t_draft"] for r in mine), sum(r["t_verify"] for r in mine)
        prompt_s = sum(r["t_prompt"] for r in mine)
        acceptance = accepted / drafted if drafted else None
        predicted = None
        if result.costs is not None and acceptance is not None and config.k <= result.costs.k_max:
            t_draft = 0.0 if config.drafter == "ngram" else None
            predicted = result.costs.expected_speedup(acceptance, config.k, t_draft)
        values = list(tps.values())
        summary.append(
            {
                "config": config.label,
                "runs": len(mine),
                "tokens_per_s_median": statistics.median(values),
                "tokens_per_s_iqr": _quantile(values, 0.75) - _quantile(values, 0.25),
                "speedup_geomean": statistics.geometric_mean(ratios) if ratios else math.nan,
                "tau": sum(r["tokens_per_step"] for r in mine) / len(mine),
                "acceptance": acceptance,
                # drafting time per proposed token: each step's forward passes, about one per token
                "draft_ms_per_token": 1000 * draft_s / drafted
                if drafted and config.drafter == "draft"
                else None,
                "share_prompt": prompt_s / total if total else 0.0,
                "share_drafting": draft_s / total if total else 0.0,
                "share_verifying": verify_s / total if total else 0.0,
                "share_other": (total - prompt_s - draft_s - verify_s) / total if total else 0.0,
                "peak_rss_mib": max(r["rss_mib"] for r in mine),
                "predicted_speedup": predicted,
                "mismatches": sum(r["identical_to_target_only"] is False for r in mine),
                "identical_to_llama_cpp": _share(r.get("identical_to_llama_cpp") for r in mine),
            }
        )
    return summary


def baseline_label(result: BenchResult) -> str:
    """What speed-ups are relative to: llama.cpp's plain decoding when it ran, else target-only."""
    return YARDSTICK.label if any(c.drafter == "llama.cpp" for c in result.configs) else TARGET_ONLY.label


def _share(flags: Iterable[bool | None]) -> float | None:
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def markdown(result: BenchResult, by_category: bool = True) -> str:
    """The result as Markdown tables: overall, then per category."""

    def table(summary: list[dict[str, Any]]) -> list[str]:
        lines = [
            f"| configuration | tokens/s median (IQR) | speed-up over {base_label} (geo. mean) | predicted "
            "| τ | acceptance | draft ms/token | time: prompt / drafting / verifying / other | peak RSS MiB "
            "| differs from target-only | identical to llama.cpp |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in summary:
            acceptance = "–" if s["acceptance"] is None else f"{s['acceptance']:.1%}"
            predicted = "–" if s["predicted_speedup"] is None else f"{s['predicted_speedup']:.2f}x"
            draft_ms = s.get("draft_ms_per_token")
            draft_ms = "–" if draft_ms is None else f"{draft_ms:.2f}"
            same = s.get("identical_to_llama_cpp")
            same = "–" if same is None else f"{same:.0%}"
            lines.append(
                f"| {s['config']} | {s['tokens_per_s_median']:.2f} ({s['tokens_per_s_iqr']:.2f}) "
                f"| {s['speedup_geomean']:.2f}x | {predicted} | {s['tau']:.2f} | {acceptance} | {draft_ms} "
                f"| {s['share_prompt']:.0%} / {s['share_drafting']:.0%} / {s['share_verifying']:.0%} "
                f"/ {s['share_other']:.0%} "
                f"| {s['peak_rss_mib']:.0f} | {s['mismatches']} | {same} |"
            )
        return lines

    base_label = baseline_label(result)
    out = ["### All prompts", "", *table(summarize(result))]
    categories = sorted({r["category"] for r in result.records})
    per_category = {category: summarize(result, category) for category in categories}
    if len(categories) > 1:
        labels = [c.label for c in result.configs if c.label != base_label]
        out += [
            "",
            f"### Speed-up over {base_label} by category (geometric mean; τ in brackets)",
            "",
            f"| category | prompts | {base_label} tokens/s | " + " | ".join(labels) + " |",
            "|---|---|---|" + "---|" * len(labels),
        ]
        for category in categories:
            rows = {row["config"]: row for row in per_category[category]}
            base = rows.get(base_label)
            n_prompts = len({r["prompt_id"] for r in result.records if r["category"] == category})
            cells = [
                f"{rows[label]['speedup_geomean']:.2f}x ({rows[label]['tau']:.2f})" if label in rows else "–"
                for label in labels
            ]
            tps = f"{base['tokens_per_s_median']:.2f}" if base else "–"
            out.append(f"| {category} | {n_prompts} | {tps} | " + " | ".join(cells) + " |")
    if by_category and len(categories) > 1:
        for category in categories:
            out += ["", f"### {category}", "", *table(per_category[category])]
    if result.peers:
        out += [
            "",
            "### Peers (same prompts, run after edgespec's configurations)",
            "",
            "| peer | status | tokens/s median | notes |",
            "|---|---|---|---|",
        ]
        for peer in result.peers:
            tps = "–" if peer.get("tokens_per_s_median") is None else f"{peer['tokens_per_s_median']:.2f}"
            out.append(f"| {peer['name']} | {peer['status']} | {tps} | {peer.get('notes', '')} |")
    if result.sampling.greedy:
        verdict = "all" if not result.failures else f"NO, {len(result.failures)} mismatches"
        if result.exact:
            out += ["", f"guarantee exact: outputs identical to target-only: {verdict}"]
        else:
            differ = sum(r["identical_to_target_only"] is False for r in result.records)
            out += [
                "",
                "guarantee distribution (llama.cpp's kernels): a greedy near-tie may break otherwise after a "
                f"verification pass; outputs differing from target-only: {differ} of "
                f"{sum(r['identical_to_target_only'] is not None for r in result.records)}",
            ]
    else:
        out += [
            "",
            "outputs not compared token by token: sampling at temperature "
            f"{result.sampling.temperature:g} (same seeds for every configuration; "
            "tests/model/test_sampling_stats.py checks the distribution)",
        ]
    return "\n".join(out)


def costs_markdown(costs: Costs, alphas: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> str:
    """The measured cost curve and the ceiling it implies."""
    lines = [
        f"target pass cost after {costs.context_tokens} context tokens; draft token "
        f"{costs.t_draft * 1000:.1f} ms = {costs.t_draft / costs.t_target[0]:.2f} of a target step",
        "",
        "| n tokens | T(n) ms | T(n)/T(1) | batch efficiency n·T(1)/T(n) |",
        "|---|---|---|---|",
    ]
    for n in range(1, len(costs.t_target) + 1):
        t = costs.t_target[n - 1]
        lines.append(
            f"| {n} | {t * 1000:.1f} | {t / costs.t_target[0]:.2f} | {costs.batch_efficiency(n):.2f} |"
        )
    lines += [
        "",
        "| acceptance rate | best k, model drafter | ceiling | best k, free drafter (n-gram) | ceiling |",
        "|---|---|---|---|---|",
    ]
    for alpha in alphas:
        k_model, s_model = costs.ceiling(alpha)
        k_free, s_free = costs.ceiling(alpha, t_draft=0.0)
        lines.append(f"| {alpha:.0%} | {k_model} | {s_model:.2f}x | {k_free} | {s_free:.2f}x |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS and library versions, git commit (and whether the working tree had
    uncommitted changes), start time: what a figure was measured on. Call it when measuring starts."""
    import datetime
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
            )
            return done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions: dict[str, str | None] = {}
    for package in ("edgespec", "llama-cpp-python", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(
    result: BenchResult, directory: Path, settings: dict[str, Any], machine: dict[str, Any] | None = None
) -> Path:
    """Write `results.json` into `directory`: atomically, via a temporary file renamed into place.

    Args:
        machine: `machine_info()` taken when the run started (taken now when None).
    """
    import json
    from dataclasses import asdict

    categories = sorted({r["category"] for r in result.records})
    data = {
        "settings": settings,
        "sampling": result.sampling.to_dict(),
        "machine": machine or machine_info(),
        "configs": [asdict(c) for c in result.configs],
        "summary": summarize(result),
        "summary_by_category": {c: summarize(result, c) for c in categories},
        "costs": result.costs.to_dict() if result.costs else None,
        "peers": result.peers,
        "failures": result.failures,
        "records": result.records,
    }
    path = directory / "results.json"
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False, default=lambda v: None))
    return path


def merge_results(paths: Sequence[Path]) -> tuple[BenchResult, dict[str, Any]]:
    """Several runs' results.json as one result, for a measurement split over runs (for instance
    one run per group of categories).

    Every figure stays a within-run comparison: each prompt was measured in exactly one run, with
    every configuration interleaved there, and speed-ups are computed per prompt. The runs must
    agree on configurations, models and settings other than which prompts they took. The cost
    curve (for the "predicted" column) is the first run's.

    Returns:
        (the merged result, the first run's settings with the runs' `categories` combined).

    Raises:
        SettingsError: a file is missing or not a results.json, or the runs do not agree.
    """
    import json

    from edgespec.bench.peers import lookup_summary

    loaded = []
    for path in paths:
        file = path / "results.json" if path.is_dir() else path
        try:
            loaded.append((file, json.loads(file.read_text(encoding="utf-8"))))
        except OSError as exc:
            raise SettingsError(f"cannot read {file}: {exc.strerror}") from None
        except ValueError:
            raise SettingsError(f"{file} is not JSON") from None
    if not loaded:
        raise SettingsError("no results to merge")
    first_file, first = loaded[0]
    for key in ("configs", "records", "settings"):
        if key not in first:
            raise SettingsError(f"{first_file} is not a bench results.json (no {key!r})")
    same = ("max_tokens", "repeat", "kernels", "threads", "target", "draft", "multi_turn")

    def configs_of(data: dict[str, Any]) -> list[dict[str, Any]]:
        # files from before a field existed lack it; its default is None
        configs = data.get("configs", [])
        return [{key: value for key, value in c.items() if value is not None} for c in configs]

    def sampling_of(data: dict[str, Any]) -> dict[str, Any]:
        return data.get("sampling") or GREEDY.to_dict()  # files from before sampling were greedy

    result = BenchResult(configs=[BenchConfig(**c) for c in configs_of(first)])
    if first.get("sampling"):
        sampling = dict(first["sampling"])
        sampling["logit_bias"] = {int(t): float(v) for t, v in sampling["logit_bias"].items()}
        result.sampling = SamplingSettings(**sampling)
    if first.get("costs"):
        result.costs = Costs(**{**first["costs"], "t_target": tuple(first["costs"]["t_target"])})
    seen: dict[str, Path] = {}
    peers: dict[str, list[dict[str, Any]]] = {}
    categories: list[str] = []
    for file, data in loaded:
        if configs_of(data) != configs_of(first) or sampling_of(data) != sampling_of(first):
            raise SettingsError(f"cannot merge {file} with {first_file}: other configurations or sampling")
        for key in same:
            if data["settings"].get(key) != first["settings"].get(key):
                raise SettingsError(f"cannot merge {file} with {first_file}: different {key}")
        for prompt_id in {r["prompt_id"] for r in data["records"]}:
            if prompt_id in seen:
                raise SettingsError(f"prompt {prompt_id} is in both {seen[prompt_id]} and {file}")
            seen[prompt_id] = file
        result.records += data["records"]
        result.failures += data["failures"]
        categories += data["settings"].get("categories") or sorted({r["category"] for r in data["records"]})
        for peer in data.get("peers", []):
            peers.setdefault(peer["name"], []).append(peer)
    for name, entries in peers.items():
        ran = [e for e in entries if e["status"] == "ran"]
        if not ran:
            result.peers.append(entries[0])
            continue
        runs = [r for e in ran for r in e["runs"]]
        others = [f"another run: {e['status']}: {e['notes']}" for e in entries if e["status"] != "ran"]
        if name.startswith("llama-cpp-python prompt lookup"):
            merged = lookup_summary(name, runs)
        else:
            timed = [r["tokens_per_second"] for r in runs if r.get("tokens_per_second")]
            merged = {
                "name": name,
                "status": "ran",
                "runs": runs,
                "tokens_per_s_median": statistics.median(timed) if timed else None,
                "notes": ran[0]["notes"],
            }
        merged["notes"] = "; ".join([merged["notes"], *others]) if others else merged["notes"]
        result.peers.append(merged)
    settings = {
        **first["settings"],
        "categories": categories,
        "merged_from": [{"file": str(f), "machine": data.get("machine")} for f, data in loaded],
    }
    return result, settings
