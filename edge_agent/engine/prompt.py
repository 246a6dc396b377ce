"""The model's chat template, rendered as Hugging Face renders it, and split around the image.

LLaVA templates put the image before the question (`USER: <image>\\n{question} ASSISTANT:`), so every
prompt about one frame starts with the same tokens up to and including the image. That shared prefix is
what `FrameContext` prefills once; only the part after the image differs per question.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """Renders one user turn holding the frame and a question, ready for the assistant's answer."""

    def __init__(self, source: str, special_tokens: dict, system_prompt: str | None = None):
        self._template = _environment().from_string(source)
        self._special_tokens = special_tokens
        self.system_prompt = system_prompt

    def render(self, question: str) -> str:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        return self._template.render(messages=messages, add_generation_prompt=True, **self._special_tokens)
