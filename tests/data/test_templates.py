"""Prompts against each family's REAL published chat template, end-of-turn labels, and video records.

A LLaVA record's `<image>\\nQuestion` must tokenize exactly as the model's own template renders an image content
part followed by the question (what the processor + template give at inference): the LLaVA templates render
`<image>\\n` themselves (no `<image>\\n\\nQuestion`), the Qwen ones put the question right after the vision block.
The template strings below are copied verbatim from the published sources named above each.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from arctic_vl.constants import IGNORE_INDEX

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json as first published: `<\s>` is a typo for `</s>`, so the
# assistant turn renders no EOS at all (issue 13 item 5).
LLAVA_NEXT_MISTRAL_OLD = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render "
    "all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] "
    "}}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + "
    "'<\\\\s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# the same template with the EOS fixed (`</s> `), as the hub repository carries it now
LLAVA_NEXT_MISTRAL = LLAVA_NEXT_MISTRAL_OLD.replace("'<\\\\s> '", "'</s> '")
# llava-hf/llava-1.5-7b-hf and llava-v1.6-vicuna-7b-hf chat_template.json (LLaVA-1.5's template; no EOS either)
LLAVA_15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)
# transformers' convert_llava_onevision_weights_to_hf.py (the template it saves with the converted processor)
LLAVA_ONEVISION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render "
    "all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% else %}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}"
    "{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llava-hf/llava-onevision-qwen2-*-ov-hf chat_template.json (as transformers' processor tests carry it): a space
# after the role, `'\n' + text`; its generation prompt is not a prefix of the assistant turn it renders
LLAVA_ONEVISION_HUB = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{# Render "
    "all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] "
    "| selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] }}"
    "{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen/Qwen2-VL-2B-Instruct tokenizer_config.json (Qwen2.5-VL-*-Instruct ship the same template)
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen3-VL-8B-Instruct chat_template.json (the tool-call branches are kept: the template is used whole)
QWEN3_VL = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (the upstream Qwen3-VL chat template, verbatim: two of its lines are longer)

#: (family, template name, template, what its assistant turn ends with: a trained end token, or None)
CASES = [
    ("llava_next", "llava-v1.6-mistral", LLAVA_NEXT_MISTRAL, "</s>"),
    ("llava_next", "llava-v1.6-mistral (old, `<\\s>`)", LLAVA_NEXT_MISTRAL_OLD, None),
    ("llava_next", "llava-1.5 / llava-v1.6-vicuna", LLAVA_15, None),
    ("llava_onevision", "llava-onevision (convert script)", LLAVA_ONEVISION, "<|im_end|>"),
    ("llava_onevision", "llava-onevision (hub)", LLAVA_ONEVISION_HUB, "<|im_end|>"),
    ("qwen2_vl", "Qwen2-VL-Instruct", QWEN2_VL, "<|im_end|>"),
    ("qwen2_5_vl", "Qwen2.5-VL-Instruct", QWEN2_VL, "<|im_end|>"),
    ("qwen3_vl", "Qwen3-VL-Instruct", QWEN3_VL, "<|im_end|>"),
]
QUESTION, ANSWER = "What colour is the shape?", "red"


def _processor(family: str, template: str):
    from arctic_vl.models.processors import build_processor
    from arctic_vl.models.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer(family)
    tokenizer.add_special_tokens({"eos_token": "</s>"})  # Mistral's EOS is a special token of its vocabulary
    processor = build_processor(family, tiny_config(family), tokenizer)
    processor.chat_template = template
    return processor


@pytest.mark.parametrize(("family", "name", "template", "end"), CASES, ids=[c[1] for c in CASES])
def test_record_prompt_is_the_models_own_prompt(family, name, template, end):
    from arctic_vl.data.encoding import SampleEncoder
    from arctic_vl.models.families import get_family

    processor = _processor(family, template)
    encoder = SampleEncoder(processor, get_family(family))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    enc = encoder.encode_text([{"role": "user", "content": f"<image>\n{QUESTION}"},
                               {"role": "assistant", "content": ANSWER}], [image.size])
    # what the model's own template renders for an image part followed by the question, as at inference
    own = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
         {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False)
    reference = processor(text=[own], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    assert enc.input_ids == reference, name
    assert "\n\n" + QUESTION not in own
    trained = processor.tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert trained.strip() == ANSWER + (end or "")
    assert (enc.unended is None) == (end is not None)


def test_template_without_end_of_turn_warns_in_inspect_data_and_at_training_start(synthetic_data, tmp_path, cli):
    """The old llava-v1.6-mistral template trains no end token: inspect-data and the data build say so, naming
    the template, the first such record and what follows its answer."""
    from types import SimpleNamespace

    from loguru import logger

    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.families import get_family
    from arctic_vl.models.tiny import make_tiny_model
    from tests.e2e_utils import write_yaml

    model_dir = make_tiny_model("llava_next", tmp_path / "model", seed=0)
    processor = _processor("llava_next", LLAVA_NEXT_MISTRAL_OLD)
    processor.save_pretrained(model_dir)
    source = synthetic_data / "train.llava.json"
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(model_dir)},
        "data": {"sources": [{"path": str(source), "sample": "first:4"}]},
        "trainer": {"output_dir": "out", "max_steps": 1},
    })
    rc, out, err = cli("inspect-data", str(config))
    assert rc == 0, err
    warning = f"warning: the chat template of {model_dir} renders no end-of-turn or EOS token after an assistant turn"
    # the first such sample of the training order (all four are)
    example = (rf"in 4 of 4 samples \(e\.g\. {re.escape(str(source))} record [0-3]: "
               r"the answer is followed by '<\\\\s> '\)")
    assert warning in out and re.search(example, out), out

    from arctic_vl.models.loading import load_processor

    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        bundle = SimpleNamespace(processor=load_processor(model_dir), family=get_family("llava_next"), model=None)
        VLMDataFactory(VLMDataConfig(sources=[{"path": str(source), "sample": "first:4"}])).build(bundle, seed=0)
    finally:
        logger.remove(sink)
    assert any(warning.removeprefix("warning: ") in m for m in messages), messages


def test_video_records_are_unsupported_video(tmp_path, png, jsonl):
    from arctic_vl.data.bad_records import BadRecordReport
    from arctic_vl.data.sources import SourceSpec, read_source
    from arctic_vl.errors import DataError

    png(tmp_path / "a.png")
    turns = [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": "a ball rolls"}]
    records = [
        {"messages": turns, "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<video>What happens?"}, turns[1]], "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": "<video>\nWhat happens?"}, turns[1]]},
        {"conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}],
         "video": "clip.mp4"},
        {"messages": turns},
    ]
    path = jsonl(tmp_path / "v.jsonl", [*records[:3], records[4]])
    with pytest.raises(DataError, match=r"v.jsonl: record 1 \(line 2\): field videos: video is not supported yet.*"
                                        r"reason: unsupported_video"):
        read_source(SourceSpec(path=str(path)), base_dir=tmp_path, seed=0, on_bad_record="error",
                    report=BadRecordReport())
    report = BadRecordReport()
    convs = read_source(SourceSpec(path=str(path)), base_dir=tmp_path, seed=0, on_bad_record="skip", report=report)
    assert [c.index for c in convs] == [0, 3] and report.by_reason() == {"unsupported_video": 2}
    llava = tmp_path / "v.json"
    llava.write_text(json.dumps([records[3]]))
    with pytest.raises(DataError, match="field video: video is not supported"):
        read_source(SourceSpec(path=str(llava)), base_dir=tmp_path, seed=0, on_bad_record="error",
                    report=BadRecordReport())
