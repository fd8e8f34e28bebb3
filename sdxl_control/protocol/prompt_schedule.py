"""A1111's prompt editing, alternation and composable ``AND``: which text the prompt is at each denoiser call.

Read as A1111 reads them (its ``modules/prompt_parser.py``; the grammar below is its lark grammar):

* ``[a:b:N]`` reads ``a`` until step ``N`` and ``b`` after; ``[a:N]`` adds ``a`` after ``N``; ``[a::N]`` removes it.
  A number written with a ``.`` is a fraction of the pass's steps (``0.5``, ``.5``, ``1.0``); without one it is a
  step (``10``). In a hires fix's second pass a fraction counts on from 1.0 (``1.5``: half way through the second
  pass) and a step from the first pass's steps.
* ``[a|b|c]`` alternates ``a``, ``b``, ``c``... from one step to the next (empty options allowed: ``[fe|]male``).
* Steps count the denoiser's calls from 0: the text of an edit switching at ``N`` is read for calls 0 to ``N``, the
  next text from call ``N + 1``. A second-order sampler (Heun, DPM2...) calls the model about twice a step, so its
  schedule counts twice the steps, as A1111 does.
* ``AND`` (upper case, a word of its own) splits the prompt into parts, each with an optional ``:weight`` at its end;
  each part is encoded apart and guidance sums them: ``uncond + sum_i w_i * scale * (cond_i - uncond)``
  (:class:`~sdxl_control.protocol.guidance.ClassifierFreeGuidance`'s ``weights``). The negative prompt has no parts.

Each scheduled text is then read for its weights (:mod:`~sdxl_control.protocol.emphasis`). A prompt whose brackets
do not parse as this grammar is read whole as text, as A1111 reads it.

Example:
    >>> prompt_schedule("a [b:c:0.5]", 10)
    [(5, 'a b'), (10, 'a c')]
    >>> composable_parts("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..base.errors import InvalidRequestError

__all__ = [
    "ScheduledPrompt",
    "prompt_schedule",
    "composable_parts",
    "text_at",
    "scheduled_prompt",
    "check_composable",
    "uses_schedules",
]

log = logging.getLogger(__name__)

# A1111's grammar (prompt_parser.schedule_parser): a fact of the format, so the same text parses the same way.
_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""

# A1111's re_AND and re_weight: AND as a word of its own, and a part's trailing ":weight".
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

# (last call it is read at, text): a prompt's texts in call order; the last entry's call is the pass's steps.
Schedule = list[tuple[int, str]]


@lru_cache(maxsize=1)
def _parser() -> Any:
    import lark

    return lark.Lark(_GRAMMAR)


def _parse(prompt: str) -> Any | None:
    import lark

    try:
        return _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return None


def _when(number: str, steps: int, first_pass_steps: int | None) -> int:
    """The last call (of ``steps``) that reads an edit's first text, as A1111 reckons it (before clamping below 1)."""
    value = float(number)
    if "." in number:  # a fraction of the pass; the second pass of a hires fix starts at 1.0
        value = (value - (1.0 if first_pass_steps is not None else 0.0)) * steps
    else:
        value -= first_pass_steps or 0
    return min(steps, int(value))


def _switches(tree: Any, steps: int, first_pass_steps: int | None) -> list[int]:
    found = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            when = _when(str(node.children[-2]), steps, first_pass_steps)
            if when >= 1:
                found.add(when)
        elif node.data == "alternate":
            found.update(range(1, steps + 1))
    return sorted(found)


def _text(node: Any, call: int, steps: int, first_pass_steps: int | None) -> str:
    """The text ``node`` reads at schedule step ``call`` (A1111's ``at_step``)."""
    from lark import Token, Tree

    if isinstance(node, Token):
        return str(node)
    if node is None:
        return ""
    assert isinstance(node, Tree)
    if node.data == "scheduled":
        before, after, _, number, _ = node.children
        chosen = before if call <= _when(str(number), steps, first_pass_steps) else after
        return _text(chosen, call, steps, first_pass_steps)
    if node.data == "alternate":
        options = node.children
        return _text(options[(call - 1) % len(options)], call, steps, first_pass_steps)
    return "".join(_text(child, call, steps, first_pass_steps) for child in node.children)


def prompt_schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> Schedule:
    """``prompt``'s texts over a pass of ``steps`` schedule steps, as ``(last step, text)`` in order (A1111's
    ``get_learned_conditioning_prompt_schedules``); ``first_pass_steps`` for a hires fix's second pass. A prompt that
    does not parse is one text throughout.

    Example:
        >>> prompt_schedule("a [b:3]", 10)
        [(3, 'a '), (10, 'a b')]
        >>> prompt_schedule("a [b:1.5] c", 10, first_pass_steps=10)
        [(5, 'a  c'), (10, 'a b c')]
    """
    tree = _parse(prompt)
    if tree is None:
        return [(steps, prompt)]
    return [(when, _text(tree, when, steps, first_pass_steps)) for when in _switches(tree, steps, first_pass_steps)]


def text_at(schedule: Schedule, call: int) -> str:
    """The text read at denoiser call ``call`` (counted from 0): the first entry whose last step is not before it (A1111's
    ``reconstruct_cond_batch``); past the end, the last.

    Example:
        >>> text_at([(3, "a"), (10, "b")], 3), text_at([(3, "a"), (10, "b")], 4)
        ('a', 'b')
    """
    for last, text in schedule:
        if call <= last:
            return text
    return schedule[-1][1]


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` split at ``AND`` into (text, weight) parts, as A1111's ``get_multicond_prompt_list`` splits it: a
    part's trailing ``:weight`` (sign and spaces allowed) is its weight (default 1), its text keeps leading spaces
    and loses trailing ones.

    Example:
        >>> composable_parts("a AND b : -0.5")
        [('a', 1.0), (' b', -0.5)]
    """
    parts = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        if match is None:  # cannot happen with this pattern, but A1111 keeps the part whole if it did
            parts.append((part, 1.0))
            continue
        text, weight = match.groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def uses_schedules(prompt: str) -> bool:
    """Whether ``prompt`` may hold editing or alternation (a ``[``), ``AND`` parts or a trailing ``:weight`` (which A1111
    reads as the weight of the prompt's one part): a prompt with none reads as plain text.

    Example:
        >>> uses_schedules("a cat"), uses_schedules("a cat:0.5"), uses_schedules("a [cat:dog:2]")
        (False, True, True)
    """
    return "[" in prompt or composable_parts(prompt) != [(prompt, 1.0)]


def check_composable(prompt: str, where: str = "the prompt") -> None:
    """Refuse ``AND`` with an empty side (``"AND"`` alone, ``"a AND"``): A1111 encodes the empty text there as one more
    part, which nobody means.

    Example:
        >>> check_composable("a cat AND")
        Traceback (most recent call last):
        ...
        sdxl_control.base.errors.InvalidRequestError: the prompt 'a cat AND' has nothing after its AND ...
    """
    parts = _AND.split(prompt)
    if len(parts) < 2:
        return
    for number, part in enumerate(parts):
        text = composable_parts(part)[0][0]
        if not text.strip():
            side = "before its first AND" if number == 0 else f"after its {_ordinal(number)}AND"
            raise InvalidRequestError(
                f"{where} {prompt!r} has nothing {side} (composable AND joins prompts, each with an optional :weight): "
                "write a prompt on each side of AND, or 'and' in lower case for the word"
            )


def _ordinal(number: int) -> str:
    return "" if number == 1 else {2: "second ", 3: "third "}.get(number, f"{number}th ")


def _warn_numbers(prompt: str, steps: int, first_pass_steps: int | None, where: str) -> None:
    """Say where an edit's number leaves one of its texts unread in this pass: A1111 accepts these silently."""
    tree = _parse(prompt)
    if tree is None:
        if "[" in prompt and ("|" in prompt or ":" in prompt):
            log.warning(
                "%s %r does not parse as A1111's prompt editing ([a:b:N], [a|b]): it is read as text throughout, as "
                "A1111 reads it; check its brackets",
                where,
                prompt,
            )
        return
    for node in tree.iter_subtrees():
        if node.data != "scheduled":
            continue
        number = str(node.children[-2])
        when = _when(number, steps, first_pass_steps)
        if float(number) < 0:
            log.warning(
                "%s switches at %s, a negative step: the text after it is read from the start (A1111 does the same)",
                where,
                number,
            )
        elif when >= steps and first_pass_steps is None and "." in number and float(number) > 1:
            log.warning(
                "%s switches at %s, a fraction beyond 1: in a first pass the text before it is read throughout "
                "(A1111 reads fractions beyond 1 in a hires fix's second pass)",
                where,
                number,
            )
        elif when >= steps and "." not in number and float(number) - (first_pass_steps or 0) >= steps:
            log.warning(
                "%s switches at step %s, at or after the pass's last (%d steps): the text before it is read "
                "throughout (write a fraction with a '.', e.g. 0.5, for a share of the steps)",
                where,
                number,
                steps + (first_pass_steps or 0),
            )


@dataclass(frozen=True)
class ScheduledPrompt:
    """A prompt's composable parts, each with its schedule and weight, and the negative prompt's schedule, over a
    pass of ``steps`` schedule steps (twice the sampling steps for a second-order sampler).

    Example:
        >>> scheduled_prompt("a [b:c:2] AND d:0.5", None, 4).texts_at(3)
        (('a c', ' d'), None)
    """

    parts: tuple[tuple[tuple[tuple[int, str], ...], float], ...]
    negative: tuple[tuple[int, str], ...] | None
    steps: int

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.parts)

    def texts_at(self, call: int) -> tuple[tuple[str, ...], str | None]:
        """The parts' texts and the negative prompt's at denoiser call ``call`` (from 0)."""
        positive = tuple(text_at(list(schedule), call) for schedule, _ in self.parts)
        return positive, None if self.negative is None else text_at(list(self.negative), call)


def scheduled_prompt(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    first_pass_steps: int | None = None,
    *,
    warn: bool = False,
) -> ScheduledPrompt:
    """``prompt``'s composable parts and both prompts' schedules over ``steps`` (see :class:`ScheduledPrompt`); with
    ``warn``, say where an edit's number leaves a text unread or brackets do not parse."""
    parts: Sequence[tuple[str, float]] = composable_parts(prompt)
    if warn:
        for where, text in (("the prompt", prompt), ("the negative prompt", negative_prompt)):
            if text is not None:
                _warn_numbers(text, steps, first_pass_steps, where)
    return ScheduledPrompt(
        parts=tuple((tuple(prompt_schedule(text, steps, first_pass_steps)), weight) for text, weight in parts),
        negative=None if negative_prompt is None else tuple(prompt_schedule(negative_prompt, steps, first_pass_steps)),
        steps=steps,
    )
