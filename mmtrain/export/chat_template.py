"""Chat templates (Jinja, for Hugging Face processors) that reproduce mmtrain's prompt templates exactly.

mmtrain puts an image right after bos, before all text, and writes each user turn as one piece
whose end already opens the answer (`USER: {text}\\nASSISTANT: `, ChatML's `<|im_start|>assistant\\n`),
so `add_generation_prompt` adds nothing. Answers end as in training: eos (plain, chat) or
`<|im_end|>` and a newline (chatml). The template is one line with no whitespace of its own, so its
tags need no whitespace control (which would also strip the turns' own trailing newlines).
"""

from __future__ import annotations

from mmtrain.data.templates import CAPTION_PROMPT

# A user turn with no text asks for a caption: the plain template has no prompt for it, the others
# mmtrain's caption prompt (what caption records train with).
_CAPTION = "{% if not text %}{% set text = '" + CAPTION_PROMPT + "' %}{% endif %}"
USER_TURNS = {
    "plain": "{% if text %}{{ text }}\n{% endif %}",
    "chat": _CAPTION + "USER: {{ text }}\nASSISTANT: ",
    "chatml": _CAPTION + "<|im_start|>user\n{{ text }}<|im_end|>\n<|im_start|>assistant\n",
}
ANSWER_ENDS = {"plain": "{{ eos_token }}", "chat": "{{ eos_token }}", "chatml": "<|im_end|>\n"}


def chat_template(template: str, with_bos: bool, image_token: str) -> str:
    """The Jinja template for mmtrain's `template`; `with_bos`: write bos (when the tokenizer does not add it)."""
    if template not in USER_TURNS:
        raise ValueError(f"no chat template for data.template={template!r}; known: {', '.join(USER_TURNS)}")
    return (
        ("{{ bos_token }}" if with_bos else "")
        + "{% set ns = namespace(image=false) %}"
        "{% for message in messages %}{% if message['content'] is not string %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set ns.image = true %}"
        "{% endif %}{% endfor %}{% endif %}{% endfor %}"
        + "{% if ns.image %}" + image_token + "{% endif %}"
        "{% for message in messages %}"
        "{% if message['content'] is string %}{% set text = message['content'] %}"
        "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') %}{% endif %}"
        "{% if message['role'] == 'user' %}" + USER_TURNS[template]
        + "{% else %}{{ text }}" + ANSWER_ENDS[template] + "{% endif %}"
        "{% endfor %}"
    )
