"""An Ollama Modelfile beside the served GGUF: FROM, TEMPLATE and stop PARAMETERs.

Ollama renders prompts with a Go template, not the Jinja one stored in the GGUF, so the
training template is translated here. It is probed with sentinel messages (system S,
user U1, assistant A1, user U2) and cut into the text around each message's content:

    system block:  HEAD_SYS S SYS_END   (or HEAD when there is no system message)
    each user:     USER_PRE U USER_END  (USER_END carries the assistant header)
    each answer:   A ASSISTANT_END      (not after the last message: Ollama continues it)

or, for templates that put the system text inside the last user message (Mistral),
USER_PRE S SEP U USER_END. The pieces are accepted only if they reassemble every fidelity
conversation exactly as the training template renders it; otherwise the Modelfile says why
it has no TEMPLATE. Each literal is a quoted Go string inside an action, so the template's
own line breaks (trimmed with `{{-`) never touch the model's text. Ollama adds BOS itself
when the GGUF says so (tokenizer.ggml.add_bos_token), so the TEMPLATE then leaves it out.
Content is inserted as is: a template that trims message content (Llama 3) is reproduced
for content without surrounding whitespace, which is what chat clients send.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from tasks.export.fidelity import CONVERSATIONS
from tasks.formatting import to_messages

S, U1, A1, U2 = "SYS_Q7", "USER_Q7", "ANSWER_Q7", "NEXT_Q7"  # sentinels: one token run each
Render = Callable[[list[dict[str, str]]], str]  # messages → prompt text, generation prompt on


@dataclass
class Shape:
    head_sys: str  # before the system text
    sys_end: str  # after it (system block) or between it and the user text (sep)
    head: str  # before the first user message when there is no system message
    user_pre: str
    user_end: str  # after the user text, up to where the answer starts
    assistant_end: str
    system_in_last_user: bool = False

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template below renders, in Python (Ollama's .System: every system
        message joined by a blank line; system messages are skipped in the loop)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if self.system_in_last_user:
            out = self.head
        else:
            out = self.head_sys + system + self.sys_end if system else self.head
        for i, m in enumerate(turns):
            last = i == len(turns) - 1
            if m["role"] == "user":
                inner = m["content"]
                if self.system_in_last_user and last and system:
                    inner = system + self.sys_end + inner
                out += self.user_pre + inner + self.user_end
            elif m["role"] == "assistant":
                out += m["content"] + ("" if last else self.assistant_end)
        return out

    def go_template(self, bos: str) -> str:
        """The same, as an Ollama TEMPLATE; `bos` is dropped from the head (Ollama adds it)."""
        head_sys = self.head_sys.removeprefix(bos) if bos else self.head_sys
        head = self.head.removeprefix(bos) if bos else self.head
        if self.system_in_last_user:
            first = f"{{{{- {_go(head)} }}}}" if head else ""
            user = (
                f"{_go(self.user_pre)}{{{{ if and $last $.System }}}}{{{{ $.System }}}}"
                f"{_go(self.sys_end)}{{{{ end }}}}{{{{ .Content }}}}{_go(self.user_end)}"
            )
        else:
            otherwise = f"{{{{- else }}}}{_go(head)}\n" if head else ""
            first = (
                f"{{{{- if .System }}}}{_go(head_sys)}{{{{ .System }}}}{_go(self.sys_end)}\n"
                f"{otherwise}{{{{- end }}}}"
            )
            user = f"{_go(self.user_pre)}{{{{ .Content }}}}{_go(self.user_end)}"
        return (
            f"{first}\n"
            "{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            f'{{{{- if eq .Role "user" }}}}{user}\n'
            '{{- else if eq .Role "assistant" }}{{ .Content }}'
            f"{{{{ if not $last }}}}{_go(self.assistant_end)}{{{{ end }}}}\n"
            "{{- end }}\n"
            "{{- end }}"
        )


def _go(text: str) -> str:
    """A literal as a Go template action; JSON string syntax is Go's string syntax."""
    return f"{{{{ {json.dumps(text, ensure_ascii=False)} }}}}" if text else ""


def _cut(text: str, marks: list[str]) -> list[str] | None:
    """The text between the marks, which must each appear once, in this order."""
    parts, rest = [], text
    for mark in marks:
        if text.count(mark) != 1 or mark not in rest:
            return None
        before, rest = rest.split(mark, 1)
        parts.append(before)
    return [*parts, rest]


def infer_shape(render: Render, stop_texts: list[str]) -> Shape | None:
    """The pieces of the template, or None when it is not one of the two shapes."""
    user, answer = {"role": "user", "content": U1}, {"role": "assistant", "content": A1}
    turns = [user, answer, {"role": "user", "content": U2}]
    plain = _cut(render(turns), [U1, A1, U2])
    with_sys = render([{"role": "system", "content": S}, *turns])
    block = _cut(with_sys, [S, U1, A1, U2])
    inside = _cut(with_sys, [U1, A1, S, U2])
    if plain is None or (block is None and inside is None):
        return None
    q0, user_end, between, last_end = plain
    if user_end != last_end:  # the assistant header must be the generation prompt
        return None
    assistant_end, user_pre = _split_turn_end(between, stop_texts)
    if not q0.endswith(user_pre):
        return None
    head = q0[: len(q0) - len(user_pre)]
    if block is not None:
        p0, p1 = block[0], block[1]
        if not p1.endswith(user_pre):
            return None
        return Shape(p0, p1[: len(p1) - len(user_pre)], head, user_pre, user_end, assistant_end)
    i0, _, _, sep, _ = inside
    if i0 != q0:
        return None
    return Shape(head, sep, head, user_pre, user_end, assistant_end, system_in_last_user=True)


def _split_turn_end(between: str, stop_texts: list[str]) -> tuple[str, str]:
    """(what closes an answer, what opens the next user turn): the cut goes after the
    end-of-turn token and the line breaks that follow it, else after leading whitespace."""
    found = [(between.find(t), t) for t in stop_texts if t and t in between]
    if found:
        at, token = min(found)
        end = at + len(token)
    else:
        end = 0
    while end < len(between) and between[end] in " \n":
        end += 1
    return between[:end], between[end:]


def modelfile(
    gguf_name: str, render: Render, stop_texts: list[str], bos: str, adds_bos: bool
) -> tuple[str, str | None]:
    """(Modelfile text, why it has no TEMPLATE or None)."""
    shape = infer_shape(render, stop_texts)
    why = None
    if shape is None:
        why = "the training template is not a per-message template this generator can translate"
    else:
        for label, record in CONVERSATIONS.items():
            messages = to_messages(record)
            if shape.render(messages) != render(messages):
                why = f"the translated template renders the '{label}' conversation differently"
                break
    lines = [
        "# Ollama Modelfile written by llmft's export stage: the prompt format the model was",
        "# trained with, and the tokens that end its answers. `ollama create NAME -f Modelfile`",
        f"FROM ./{gguf_name}",
    ]
    if shape is not None and why is None:
        template = shape.go_template(bos if adds_bos else "")
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append(f"# no TEMPLATE: {why}; Ollama falls back to the GGUF's own template")
    lines += [f"PARAMETER stop {json.dumps(t, ensure_ascii=False)}" for t in stop_texts if t]
    return "\n".join(lines) + "\n", why
