"""Conversations (``data.format=messages``): check the turns, and render them with the model's chat template.

A conversation is a list of ``{role, content}`` turns, roles ``system``, ``user`` and ``assistant``. It trains as
one prompt/completion row, the form the rest of the SFT path (TRL's ``SFTTrainer``, the fast path, sampling and
predict) already takes: the prompt is every turn before the last assistant turn, rendered by the tokenizer's chat
template with its generation prompt; the completion is what the template appends for that assistant turn (its
content and end-of-turn text). So the loss covers the last assistant turn only; earlier assistant turns are
context. The functions here return faults as text and row positions; :mod:`src.data` raises them as a DataError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from src import console

ROLES = ("system", "user", "assistant")
# A Parquet list arrives as np.ndarray; JSON and JSONL give lists.
TURN_LISTS = (list, tuple, np.ndarray)


def template_problem(tokenizer) -> Optional[str]:
    """Why the tokenizer cannot render conversations, or None."""
    if tokenizer is None:
        return "data.format=messages renders rows with the model's chat template, and no tokenizer was given"
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        return (
            f"data.format=messages: the tokenizer of {name} has no chat template to render the turns with; "
            "use a chat (instruct) model, or data.format=columns with data.prompt_template"
        )
    return None


def turn_faults(cell: Any, need_assistant: bool = True) -> list[str]:
    """What is wrong with one conversation cell (nothing: an empty list)."""
    if isinstance(cell, str):  # a CSV cell, or a JSON string where a list was meant
        return ["text, not a list of turns (a CSV cell cannot hold them: use JSONL, JSON or Parquet)"]
    if not isinstance(cell, TURN_LISTS):
        return [f"not a list of turns ({'empty' if _is_missing(cell) else f'a {type(cell).__name__}'})"]
    faults = []
    if not all(isinstance(t, dict) for t in cell):
        return ["a turn that is not a {role, content} object"]
    if not all(isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in cell):
        faults.append("a turn without a 'role' and 'content' string")
    unknown = sorted({t["role"] for t in cell if isinstance(t.get("role"), str)} - set(ROLES))
    if unknown:
        faults.append(f"unknown role(s) {', '.join(map(repr, unknown))} (known: {', '.join(ROLES)})")
    if need_assistant and not any(t.get("role") == "assistant" for t in cell):
        faults.append("no assistant turn to train on")
    elif need_assistant and not faults and not _last_assistant(cell)["content"].strip():
        faults.append("an empty last assistant turn")
    return faults


def _is_missing(cell: Any) -> bool:
    """None, NaN, or pandas' NA or NaT (a JSON row without the key, a Parquet null)."""
    if isinstance(cell, float):
        return math.isnan(cell)
    return cell is None or type(cell).__name__ in ("NAType", "NaTType")


def conversation_faults(cells: Sequence[Any], need_assistant: bool = True) -> dict[str, np.ndarray]:
    """Each fault found in the cells, with a mask of the rows that have it."""
    found: dict[str, np.ndarray] = {}
    for i, cell in enumerate(cells):
        for fault in turn_faults(cell, need_assistant):
            found.setdefault(fault, np.zeros(len(cells), dtype=bool))[i] = True
    return found


def note_earlier_replies(cells: Sequence[Any]) -> None:
    """Say how many conversations hold assistant turns before their last: those are not trained on."""
    earlier = sum(sum(t.get("role") == "assistant" for t in cell) > 1 for cell in cells)
    if earlier:
        console.log.warning(
            f"note: {earlier} of {len(cells)} conversations have more than one assistant turn; the loss is on each "
            "conversation's last assistant turn, the earlier ones are context"
        )


def turns_of(cell: Any) -> list[dict[str, str]]:
    """The checked turns as plain dicts of role and content: other keys (a Parquet struct's nulls) are dropped."""
    return [{"role": t["role"], "content": t["content"]} for t in cell]


def _last_assistant(turns: Sequence[dict]) -> dict:
    return next(t for t in reversed(turns) if t.get("role") == "assistant")


def _render(tokenizer, turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The SFT path tokenizes text as it comes, with the tokenizer's own special tokens; a template that writes
    # the BOS as well (Llama 3's) would give two.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def prompt_of(tokenizer, turns: list[dict[str, str]]) -> str:
    """The prompt that asks the model for the next assistant turn after ``turns``."""
    return _render(tokenizer, turns, add_generation_prompt=True)


def split_at_last_reply(turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], Optional[dict[str, str]]]:
    """(the turns before the last assistant turn, that turn); (all turns, None) when no assistant turn."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    return (turns, None) if last is None else (turns[:last], turns[last])


def prompt_completion(tokenizer, turns: list[dict[str, str]]) -> tuple[str, str]:
    """The conversation up to its last assistant turn as (prompt, completion); turns after that one are dropped.

    Raises ValueError when the template renders the conversation so that the prompt is not its start (the
    completion's tokens could then not be told from the prompt's).
    """
    context, reply = split_at_last_reply(turns)
    prompt = prompt_of(tokenizer, context)
    full = _render(tokenizer, [*context, reply], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the turns before the last assistant turn differently alone")
    completion = full[len(prompt) :]
    eos = tokenizer.eos_token
    # The template's text after the end-of-turn EOS (a newline) is no part of the reply: cut there, so the
    # trainer does not append a second EOS.
    if eos and eos in completion and not completion[completion.rfind(eos) + len(eos) :].strip():
        completion = completion[: completion.rfind(eos) + len(eos)]
    return prompt, completion
