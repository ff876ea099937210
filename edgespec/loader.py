"""From what a user names (a GGUF path, "default", "ngram", "none") to a ready engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import models
from .chat import render_chat
from .compat import check_compatible
from .drafting import Drafter, ModelDrafter, NgramDrafter
from .engine import SpeculativeEngine
from .errors import PromptError, SettingsError
from .runtimes.base import Runtime, RuntimeSettings

DEFAULT = "default"


@dataclass(frozen=True)
class LoadedPair:
    """An engine plus the paths it was built from (for reports)."""

    engine: SpeculativeEngine
    target_path: Path
    draft: str  # a path, "ngram" or "none"

    @property
    def draft_runtime(self) -> Runtime | None:
        """The draft model's runtime, or None for an n-gram drafter or none."""
        drafter = self.engine.drafter
        return drafter.runtime if isinstance(drafter, ModelDrafter) else None

    def close(self) -> None:
        if self.draft_runtime is not None:
            self.draft_runtime.close()
        self.engine.target.close()


def resolve_model_path(
    spec: str | os.PathLike[str] | None, role: str, progress: Callable | None = None
) -> Path:
    """A user's model argument as a GGUF path: "default"/None means the default model of `role`."""
    if spec is None or str(spec) == DEFAULT:
        return models.resolve(models.DEFAULT_MODELS[role], progress)
    return Path(spec).expanduser()


def load(
    target: str | os.PathLike[str] | None = None,
    draft: str | os.PathLike[str] | None = DEFAULT,
    settings: RuntimeSettings | None = None,
    draft_gpu_layers: int = 0,
    progress: Callable | None = None,
    draft_provider: str | None = None,
) -> LoadedPair:
    """Load a target and a drafter, checking that they are compatible.

    Args:
        target: GGUF path, or None / "default" for the default target.
        draft: GGUF path, ONNX export folder, "default" (the default drafter), "ngram" (prompt
            lookup) or "none".
        settings: runtime settings for the target.
        draft_gpu_layers: layers of a draft model to offload to a GPU. Otherwise the draft model
            runs with the target's settings, but always on llama.cpp's fast kernels: its rounding
            cannot change the output, only which tokens are proposed.
        progress: progress factory for joining a default model on first use (see models.resolve).
        draft_provider: ONNX Runtime execution provider for an ONNX drafter.
    """
    from .runtimes.llama_cpp import LlamaCppRuntime

    settings = settings or RuntimeSettings()
    target_path = resolve_model_path(target, "target", progress)
    target_rt = LlamaCppRuntime(target_path, settings)
    draft_spec = DEFAULT if draft is None else str(draft)
    drafter: Drafter | None
    try:
        if draft_spec == "none":
            drafter = None
            label = "none"
        elif draft_spec == "ngram":
            drafter = NgramDrafter()
            label = "ngram"
        else:
            draft_rt = load_draft_model(
                draft_spec, target_rt, settings, draft_gpu_layers, progress, provider=draft_provider
            )
            drafter = ModelDrafter(draft_rt, max_id=target_rt.vocab.n_vocab)
            label = str(draft_rt.path)
    except BaseException:
        target_rt.close()
        raise
    return LoadedPair(SpeculativeEngine(target_rt, drafter), target_path, label)


def load_draft_model(
    spec: str | os.PathLike[str],
    target: Runtime,
    settings: RuntimeSettings,
    gpu_layers: int = 0,
    progress: Callable | None = None,
    provider: str | None = None,
) -> Runtime:
    """Load a draft model and check that it can draft for `target`.

    Args:
        spec: "default", a GGUF path, or an ONNX export (`edgespec export onnx` folder or its
            model.onnx), which runs on ONNX Runtime.
        settings: the target's settings; the drafter always uses fast kernels: its rounding cannot
            change the output, only which tokens are proposed.
        gpu_layers: llama.cpp layers to offload (GGUF drafters).
        provider: ONNX Runtime execution provider (ONNX drafters; None picks the best available).
    """
    draft_path = resolve_model_path(spec, "draft", progress)
    draft_settings = replace(settings, gpu_layers=gpu_layers, kernels="fast")
    draft_rt: Runtime
    if is_onnx_model(draft_path):
        from .runtimes.onnx import OnnxRuntime

        draft_rt = OnnxRuntime(draft_path, draft_settings, provider=provider)
    else:
        from .runtimes.llama_cpp import LlamaCppRuntime

        if provider is not None:
            raise SettingsError(
                "--draft-provider applies to ONNX drafters (an `edgespec export onnx` folder)"
            )
        draft_rt = LlamaCppRuntime(draft_path, draft_settings)
    try:
        check_compatible(target, draft_rt)
    except BaseException:
        draft_rt.close()
        raise
    return draft_rt


def is_onnx_model(path: Path) -> bool:
    """An ONNX export: a folder with model.onnx, or an .onnx file."""
    return path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file())


def prompt_tokens(target: Runtime, text: str, *, raw: bool = False, system: str | None = None) -> list[int]:
    """Tokenize a user prompt, formatted with the model's chat template unless `raw`.

    Special tokens in the text are parsed in both modes, so a hand-formatted prompt works with
    `raw`. BOS is added when the model asks for it and the template did not already write it.
    """
    if not text.strip():
        raise PromptError("the prompt is empty")
    template = getattr(target, "chat_template", lambda: None)()
    if raw or not template:
        if not raw and not template:
            raise PromptError(
                f"{target.path.name} has no chat template (tokenizer.chat_template); pass --raw to send the "
                "prompt as it is"
            )
        return target.tokenize(text, add_special=True, parse_special=True)
    messages: list[Mapping[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return chat_tokens(target, template, messages)


def chat_tokens(target: Runtime, template: str, messages: Sequence[Mapping[str, str]]) -> list[int]:
    vocab = target.vocab
    bos = target.token_text(vocab.bos).decode("utf-8", "replace") if vocab.bos is not None else ""
    eos = target.token_text(vocab.eos).decode("utf-8", "replace") if vocab.eos is not None else ""
    rendered = render_chat(template, messages, bos_token=bos, eos_token=eos)
    add_bos = vocab.add_bos and not (bos and rendered.startswith(bos))
    tokens = target.tokenize(rendered, add_special=False, parse_special=True)
    if add_bos and vocab.bos is not None:
        tokens.insert(0, vocab.bos)
    return tokens
