"""Prompt templates: a row -> (prompt, completion) text pair, or a chat conversation.

A text template is a string with {field} placeholders; its LAST placeholder is the completion (what the
loss is computed on), everything before it is the prompt. At generation time the same prompt is built
with the completion left empty, so training and inference see identical prompt tokens.
"""

from __future__ import annotations

import string

from .errors import RecipeError

DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "qa": {"question": "question", "answer": "answer"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "messages": {"messages": "messages"},
    "text": {"text": "text"},
}


# Seed 000 (kanana-1.5-8b): the Korean question/answer template.
KO_QA = "### 질문: {question}\n\n### 답변: {answer}"
# Seed 004 (Llama-3.1-8B, unsloth notebook): the Korean alpaca template.
KO_ALPACA = (
    "아래에는 작업을 설명하는 지시 사항과 추가적인 컨텍스트를 제공하는 입력이 있습니다. "
    "요청을 적절하게 완료하는 응답을 작성하세요.\n\n"
    "### instruction:\n{instruction}\n\n### input:\n{input}\n\n### output:\n{output}"
)
ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)

NAMED = {"ko-qa": KO_QA, "ko-alpaca": KO_ALPACA, "alpaca": ALPACA}
# "chat": the tokenizer's own chat template; "plain": a text row, loss on every token.
SPECIAL = ("chat", "plain")
AUTO = {"qa": "ko-qa", "alpaca": "ko-alpaca", "messages": "chat", "text": "plain"}


def resolve(template: str, fmt: str) -> str:
    """The template name or literal string to use for a data format."""
    return AUTO[fmt] if template == "auto" else template


def placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def text_template(template: str) -> str:
    return NAMED.get(template, template)


def check(template: str, fmt: str) -> None:
    """Raise RecipeError (field + fix) when the template cannot render rows of this format."""
    if template == "chat":
        if fmt not in ("messages", "qa"):
            raise RecipeError(f"data.template=chat needs data.format messages or qa, not '{fmt}'")
        return
    if template == "plain":
        if fmt != "text":
            raise RecipeError(f"data.template=plain is for data.format=text; for '{fmt}' use "
                              f"data.template={AUTO[fmt]} or a literal template string")
        return
    if fmt in ("messages", "text"):
        raise RecipeError(f"data.format={fmt} takes data.template={AUTO[fmt]}, not '{template}'")
    names = placeholders(text_template(template))
    if not names:
        raise RecipeError(f"data.template '{template}' is neither a known name ({', '.join([*NAMED, *SPECIAL])}) "
                          "nor a string with {field} placeholders")
    allowed = list(DEFAULT_FIELDS[fmt])
    bad = [n for n in names if n not in allowed]
    if bad:
        raise RecipeError(f"data.template uses {{{bad[0]}}}, which format '{fmt}' does not have: use {allowed}")
    if names[-1] != allowed[-1]:
        raise RecipeError(f"data.template must end with the completion placeholder {{{allowed[-1]}}}")


def split(template: str, values: dict[str, str]) -> tuple[str, str]:
    """Render a text template into (prompt, completion)."""
    text = text_template(template)
    last = placeholders(text)[-1]
    head, _, tail = text.rpartition("{" + last + "}")
    return head.format(**values), values[last] + tail.format(**values)
