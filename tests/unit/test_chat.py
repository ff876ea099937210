import pytest

from edgespec.chat import render_chat
from edgespec.errors import PromptError

from ..tinymodels import DEFAULT_TEMPLATE


def test_renders_messages_and_generation_prompt():
    text = render_chat(DEFAULT_TEMPLATE, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_helpers_and_bos():
    template = (
        "{{ bos_token }}{{ messages | tojson }}{% if not messages %}{{ raise_exception('none') }}{% endif %}"
    )
    assert render_chat(template, [{"role": "user", "content": "é"}], bos_token="<s>") == (
        '<s>[{"role": "user", "content": "é"}]'
    )
    with pytest.raises(PromptError, match="none"):
        render_chat(template, [])


def test_broken_template_is_a_prompt_error():
    with pytest.raises(PromptError, match="could not be rendered"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
