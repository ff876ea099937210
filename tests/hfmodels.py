"""Tiny random Hugging Face checkpoints for exporter tests.

`build_tiny_hf` writes a complete checkpoint directory in well under a second: `config.json`,
`model.safetensors` (or shards with `model.safetensors.index.json`), `generation_config.json`,
`tokenizer.json` and `tokenizer_config.json` with a ChatML chat template. The model is a real
`Qwen2ForCausalLM` or `LlamaForCausalLM` with random weights, so anything that reads checkpoints
(the GGUF and ONNX exporters) can be checked against transformers itself.

Design choices that matter to tests:

* The tokenizer is a byte-level BPE trained on a built-in text (`TRAINING_TEXT`), with the
  pre-tokenizer regex of the real model family: Qwen2's for "qwen2" and Llama 3's for "llama".
  llama.cpp's own tokenizer for those families therefore splits text exactly as the HF tokenizer
  does. The special tokens `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` come after the
  trained vocabulary, as in Qwen2 (ids `n_trained`, `n_trained + 1`, `n_trained + 2`).
* Random init alone leaves RMS-norm weights at 1 and Qwen2's q/k/v biases at 0, which would hide
  a norm or bias written to the wrong place. Every norm weight and bias is perturbed, and the
  matrices use a larger std than transformers' default, so logits spread over a few units.
* `dtype` selects how the weights are stored (float32, float16, bfloat16); the float32 weights are
  first rounded to float16 so that an F16 export holds exactly the checkpoint's values.

Only the `export` extra (torch, transformers, tokenizers, safetensors) is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML template stored in tokenizer_config.json's `chat_template`."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Added special tokens, in id order after the trained vocabulary."""

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer split regex, as in its tokenizer.json (digits split one by one)."""

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3's pre-tokenizer split regex (digits in groups of up to three)."""

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A cache keeps what was computed so that it need not be
computed again; a key-value cache keeps the keys and values of every earlier token. Speculative
decoding lets a small draft model propose tokens which the large target model checks in one pass.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Hello, world! How are you today? I'm fine, thanks; we'll see what they've done. It's 2024 and
3.14159 is close to pi, while 1000000 is a million. Models, tokens, logits, layers, heads, weights.
class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
Write a Python function that returns the n-th Fibonacci number, then explain what it does.
"""
"""Built-in text the tiny tokenizer is trained on (English prose, code, numbers)."""

Arch = Literal["qwen2", "llama"]


def build_tokenizer(arch: Arch = "qwen2", vocab_size: int = 320):
    """Train a byte-level BPE tokenizer like the one of `arch`'s real models.

    Args:
        arch: "qwen2" (Qwen2 regex, NFC normalizer) or "llama" (Llama 3 regex, merges ignored for
            whole words present in the vocabulary, as in Llama 3's tokenizer.json).
        vocab_size: size of the trained vocabulary (at least 256 + a few merges); the special tokens
            come on top of it.

    Returns:
        A `tokenizers.Tokenizer` with `SPECIAL_TOKENS` added at ids vocab_size, vocab_size + 1, ...
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    pattern = QWEN2_PATTERN if arch == "qwen2" else LLAMA3_PATTERN
    tokenizer = Tokenizer(models.BPE(ignore_merges=arch == "llama"))
    if arch == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _perturb_(model, generator, scale: float) -> None:
    """Give every 1-D parameter (norm weights, biases) random values around its init."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.add_(noise if not name.endswith("bias") else noise * 2.0)


def build_tiny_hf(
    directory: str | Path,
    arch: Arch = "qwen2",
    seed: int = 0,
    *,
    tie_embeddings: bool | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 320,
    vocab_padding: int = 0,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    init_std: float = 0.1,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    max_shard_size: str | None = None,
    add_bos: bool | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Path:
    """Write a tiny random HF checkpoint (model + tokenizer) to `directory`.

    Args:
        directory: output folder (created if needed); existing files of the same names are replaced.
        arch: "qwen2" (`Qwen2ForCausalLM`, q/k/v biases) or "llama" (`LlamaForCausalLM`, no biases).
        seed: seeds the weights; the same arguments give the same files.
        tie_embeddings: share the input embedding with the LM head; default True for qwen2 (as the
            small Qwen2.5 models), False for llama.
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: model shape. llama.cpp's
            K-quants (Q4_K, ...) need the input width of a matrix (hidden_size, intermediate_size) to
            be a multiple of 256; other widths get a fallback type per tensor.
        vocab_size: trained tokenizer vocabulary; the model's vocabulary is
            `vocab_size + len(SPECIAL_TOKENS) + vocab_padding`.
        vocab_padding: extra embedding rows no token maps to (real models round their vocabulary up).
        max_position_embeddings, rope_theta: written to config.json.
        init_std: std of the random matrices (transformers' default of 0.02 gives near-flat logits).
        dtype: storage dtype of the weights in model.safetensors.
        max_shard_size: e.g. "100KB" to split the weights into shards with an index file.
        add_bos: whether the tokenizer prepends BOS (`<|endoftext|>` serves as BOS); default False
            for qwen2 (no BOS, as Qwen2) and True for llama.
        chat_template: Jinja template for tokenizer_config.json, or None for none.

    Returns:
        `directory` as a Path.
    """
    import torch
    import transformers
    from tokenizers import processors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tie_embeddings is None:
        tie_embeddings = arch == "qwen2"
    if add_bos is None:
        add_bos = arch == "llama"

    tokenizer = build_tokenizer(arch, vocab_size)
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    endoftext = tokenizer.token_to_id("<|endoftext|>")
    im_end = tokenizer.token_to_id("<|im_end|>")
    bos = "<|endoftext|>" if add_bos else None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, endoftext)]
        )

    common = dict(
        vocab_size=n_tokens + vocab_padding,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_embeddings,
        initializer_range=init_std,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        dtype=dtype,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        model_class = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
        model_class = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'qwen2' or 'llama'")

    torch.manual_seed(seed)
    model = model_class(config).eval()
    _perturb_(model, torch.Generator().manual_seed(seed + 1), scale=0.1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.float16).to(torch.float32))
    model = model.to(getattr(torch, dtype))
    save_args = {"safe_serialization": True}
    if max_shard_size is not None:
        save_args["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **save_args)

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=max_position_embeddings,
    )
    fast.save_pretrained(directory)
    # Written by hand so that the template and add_bos_token land in tokenizer_config.json itself,
    # whatever the transformers version does with templates (newer ones write chat_template.jinja).
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["add_bos_token"] = add_bos
    tokenizer_config["add_eos_token"] = False
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    else:
        tokenizer_config.pop("chat_template", None)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    return directory


def load_hf(directory: str | Path):
    """Load a checkpoint written by `build_tiny_hf` as (float32 model in eval mode, tokenizer).

    Returns:
        `(model, tokenizer)`: an `AutoModelForCausalLM` in float32 and an `AutoTokenizer`.
    """
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer
