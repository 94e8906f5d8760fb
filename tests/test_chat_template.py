"""Chat templates: read from a model directory and rendered to the very text transformers' apply_chat_template gives,
for the demo model's template and for templates in the styles of Llama 3, Mistral and ChatML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bdlora_jax.chat_template import ChatTemplateError, load_chat_template
from bdlora_jax.demo import MODEL_DIR
from bdlora_jax.errors import InvalidRequestError
from bdlora_jax.tokenizer import DEMO_CHAT_TEMPLATE, demo_tokenizer_config

LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""
# block tags on their own indented lines (trim_blocks / lstrip_blocks), a namespace, tojson, break, generation
CHATML = """{% set ns = namespace(users=0) %}
{% for message in messages %}
    {% if message.role == 'user' %}
        {% set ns.users = ns.users + 1 %}
    {% endif %}
<|im_start|>{{ message.role }}
{% if message.role == 'assistant' %}
{% generation %}{{ message.content }}{% endgeneration %}
{% else %}
{{ message.content }}
{% endif %}
<|im_end|>
    {% if loop.last and not add_generation_prompt %}
        {% break %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant {{ ns.users | tojson }} {{ messages[-1].content | tojson }}
{% endif %}
"""
TEMPLATES = {"demo": DEMO_CHAT_TEMPLATE, "llama3": LLAMA3, "mistral": MISTRAL, "chatml": CHATML}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there"}],
    "system": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of sky?"}],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "<b>Ünïcode & \"quotes\"</b>\n  spaced  "},
    ],
    "assistant-last": [
        {"role": "user", "content": "Count to three"},
        {"role": "assistant", "content": "1 2 3"},
    ],
}


def model_dir(root: Path, name: str, template: str, **config) -> Path:
    """A tokenizer directory: the demo model's tokenizer.json and a tokenizer_config.json with this template."""
    path = root / name
    path.mkdir()
    shutil.copy(MODEL_DIR / "tokenizer.json", path / "tokenizer.json")
    body = {**demo_tokenizer_config(), "bos_token": "<s>", **config, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(body))
    return path


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {name: model_dir(root, name, template) for name, template in TEMPLATES.items()}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_rendering_equals_transformers(template_dirs, template, conversation, add_generation_prompt):
    from transformers import AutoTokenizer

    path = template_dirs[template]
    messages = CONVERSATIONS[conversation]
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert load_chat_template(path).render(messages, add_generation_prompt) == expected


def test_template_refusal_is_a_request_error(template_dirs):
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(template_dirs["mistral"]).apply_chat_template(messages, tokenize=False)
    with pytest.raises(InvalidRequestError, match="must alternate") as caught:
        load_chat_template(template_dirs["mistral"]).render(messages)
    assert caught.value.field == "messages"


def test_sandbox_refuses_unsafe_templates(tmp_path):
    template = load_chat_template(model_dir(tmp_path, "unsafe", "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(InvalidRequestError, match="unsafe"):
        template.render([{"role": "user", "content": "x"}])


def test_demo_model_ships_its_template():
    shipped = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert shipped == demo_tokenizer_config()
    rendered = load_chat_template(MODEL_DIR).render(CONVERSATIONS["system"])
    assert rendered == "<s><|system|>\nAnswer in one word.</s>\n<|user|>\nColour of sky?</s>\n<|assistant|>\n"


def test_special_tokens_as_added_token_objects(tmp_path):
    path = model_dir(tmp_path, "objects", "{{ bos_token }}|{{ eos_token }}",
                     bos_token={"content": "<s>", "special": True}, eos_token={"content": "</s>", "special": True})
    assert load_chat_template(path).render([]) == "<s>|</s>"


def test_named_templates_and_template_file(tmp_path):
    named = model_dir(tmp_path, "named", [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert load_chat_template(named).render([]) == "D"
    separate = tmp_path / "separate"
    separate.mkdir()
    (separate / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_chat_template(separate).render([{"role": "user", "content": "x"}]) == "J1"


def test_model_without_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path) is None


@pytest.mark.parametrize("config,needles", [
    ("{not json", ["tokenizer_config.json", "not valid JSON"]),
    ("[1, 2]", ["tokenizer_config.json", "JSON object"]),
    (json.dumps({"chat_template": 7}), ["tokenizer_config.json", "chat_template"]),
    (json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}]}), ["chat_template", "default"]),
    (json.dumps({"chat_template": "{% for m in messages %}"}), ["tokenizer_config.json", "does not compile"]),
])
def test_bad_template_files(tmp_path, config, needles):
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ChatTemplateError) as caught:
        load_chat_template(tmp_path)
    for needle in needles:
        assert needle in str(caught.value)
