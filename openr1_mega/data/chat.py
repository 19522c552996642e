"""Chat formatting: conversations to token ids with an assistant-only loss mask.

The tokenizer's own chat template renders the text, so the tokens the trainer sees are
exactly the ones vLLM sees at rollout. The mask marks the tokens of assistant turns
(their content and the end-of-turn token), found by rendering the conversation prefix by
prefix: a token is trained on only if the assistant produced it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    """One tokenised conversation: ids [S] and loss_mask [S] (1 = assistant token)."""

    input_ids: list[int]
    loss_mask: list[int]


def prompt_messages(problem: str, system_prompt: str | None = None) -> list[dict]:
    """The chat messages that ask `problem`, with an optional system prompt first."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": problem}]


def encode_prompt(tokenizer, problem: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt up to and including the assistant header."""
    return _render(tokenizer, prompt_messages(problem, system_prompt), generation_prompt=True)


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None
                        ) -> Example:
    """Token ids and assistant-only loss mask of a whole conversation.

    Raises ValueError naming the problem for an empty conversation, an unknown role, or
    a conversation without any assistant turn (it would contribute no loss).
    """
    if not messages:
        raise ValueError("messages is empty")
    ids, mask = [], []
    for i, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role must be system/user/assistant, "
                             f"got {message.get('role')!r}")
        if message["role"] == "assistant":
            prefix = _render(tokenizer, messages[:i], generation_prompt=True)
            _extend(ids, mask, prefix, 0)
        full = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        _extend(ids, mask, full, int(message["role"] == "assistant"))
    if not any(mask):
        raise ValueError("conversation has no assistant turn to train on")
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return Example(ids, mask)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _extend(ids: list[int], mask: list[int], rendered: list[int], value: int) -> None:
    """Append the part of `rendered` past `ids` (templates render prefixes identically)."""
    if rendered[:len(ids)] != ids:
        raise ValueError("chat template does not render conversation prefixes stably; "
                         "cannot derive an assistant-only loss mask")
    new = rendered[len(ids):]
    ids.extend(new)
    mask.extend([value] * len(new))
