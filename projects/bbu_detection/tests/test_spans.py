"""Teacher/student spans of the LM labels, exact for the Qwen2-VL, Qwen2.5-VL and Qwen3-VL chat templates.

The tiny models carry a plain ChatML template; the templates below reproduce how each family's own template
renders (written for this test): Qwen2-VL and Qwen2.5-VL add a default system turn and render images as
`<|vision_start|><|image_pad|><|vision_end|>`; Qwen3-VL has no default system turn, renders content through a
macro with whitespace control and drops an assistant turn's reasoning before `</think>`.
"""

from __future__ import annotations

import pytest
import torch
from bbu_detection.spans import NONE, STUDENT, TEACHER, label_runs, span_ids, span_labels

from arctic_vl import IGNORE_INDEX

QWEN2_VL_STYLE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_VL_STYLE = (
    "{%- macro render(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for part in content -%}{%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- for message in messages -%}{%- set content = render(message.content) -%}"
    "{%- if message.role == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TEMPLATES = {"qwen2_vl": QWEN2_VL_STYLE, "qwen2_5_vl": QWEN2_VL_STYLE, "qwen3_vl": QWEN3_VL_STYLE}

MESSAGES = [
    {"role": "user", "content": "<image>\nDescribe the objects."},
    {"role": "assistant", "content": "red circle, blue square"},
    {"role": "user", "content": "<image>\nDescribe the objects."},
    {"role": "assistant", "content": "green triangle"},
    {"role": "user", "content": "<image>\nDescribe the objects."},
    {"role": "assistant", "content": "yellow circle"},
]


def test_label_runs_and_span_ids():
    labels = [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 8, 9]
    assert label_runs(labels) == [(1, 3), (5, 6), (7, 9)]
    assert span_ids(labels, 3) == [NONE, TEACHER, TEACHER, NONE, NONE, TEACHER, NONE, STUDENT, STUDENT]
    # max_length cut the last turn away: no student span, the rest stays teacher
    assert span_ids(labels[:6], 3) == [NONE, TEACHER, TEACHER, NONE, NONE, TEACHER]
    with pytest.raises(ValueError, match="3 trained spans for 2 assistant turns"):
        span_ids(labels, 2)
    t = torch.tensor([labels])
    s = torch.tensor([span_ids(labels, 3)])
    assert span_labels(t, s, STUDENT).tolist() == [[IGNORE_INDEX] * 7 + [8, 9]]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_spans_exact_for_family_templates(family, tmp_path):
    from arctic_vl import (
        ModelBundle,
        VLMDataConfig,
        VLMDataFactory,
        family_of_dir,
        load_processor,
        make_tiny_model,
    )

    path = make_tiny_model(family, tmp_path / family, seed=0)
    processor = load_processor(path)
    processor.chat_template = TEMPLATES[family]
    bundle = ModelBundle(torch.nn.Identity(), processor, family_of_dir(path))
    factory = VLMDataFactory(VLMDataConfig(sources=["unused.jsonl"]))
    encoder = factory.encoder(bundle)
    size = 28 * 2 if family != "qwen3_vl" else 32 * 2
    enc = encoder.encode_text([dict(m) for m in MESSAGES], [(size, size)] * 3)
    spans = span_ids(enc.labels, 3)
    tok = processor.tokenizer
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.") == (family != "qwen3_vl")

    def decoded(kind: int) -> list[str]:
        out, cur = [], []
        for tid, k in zip(enc.input_ids, spans):
            if k == kind:
                cur.append(tid)
            elif cur:
                out.append(tok.decode(cur))
                cur = []
        if cur:
            out.append(tok.decode(cur))
        return out

    assert decoded(TEACHER) == ["red circle, blue square<|im_end|>", "green triangle<|im_end|>"]
    assert decoded(STUDENT) == ["yellow circle<|im_end|>"]
    # labelled tokens are exactly the spans, and their labels are the tokens themselves
    assert [k != NONE for k in spans] == [label != IGNORE_INDEX for label in enc.labels]
    assert all(label == tid for label, tid in zip(enc.labels, enc.input_ids) if label != IGNORE_INDEX)
