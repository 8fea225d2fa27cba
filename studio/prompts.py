"""Prompt text: templates, A1111 attention syntax, BREAK (pure text; the encoding is studio.draft.embeds).

``parse_prompt`` follows AUTOMATIC1111's ``parse_prompt_attention`` rule for rule. A1111 syntax this studio
does not implement is refused by ``check_prompt`` with an error naming the construct, never rendered as
text: prompt editing ``[from:to:when]``, alternation ``[a|b]``, composable diffusion ``a AND b`` and
extra-network tags such as ``<lora:name:0.8>`` (LoRAs are loaded with ``--lora`` or a style preset).
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from studio.errors import InputError

logger = logging.getLogger(__name__)

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default ``comma_padding_backtrack``

# A1111 modules/prompt_parser.py ``re_attention`` and ``re_break``, unchanged.
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_AND = re.compile(r"\bAND\b")  # A1111 get_multicond_prompt_list's ``re_AND``: an uppercase separate word
_RE_EXTRA_NETWORK = re.compile(r"<(\w[\w-]*):([^>]+)>")  # A1111 extra_networks' ``<name:args>`` tags
_OPENING = {")": "(", "]": "["}
_RE_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # lark's SIGNED_NUMBER
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and the attention weight it carries."""

    text: str
    weight: float


# ---------------------------------------------------------------- parsing


def parse_prompt(text: str) -> list[list[Fragment]]:
    """Parse A1111 attention syntax into BREAK-separated segments of weighted fragments."""
    check_prompt(text)
    parsed = _parse_attention(text)  # [text | None, weight]; None marks a BREAK
    segments: list[list[list]] = [[]]
    for item in parsed:
        if item[0] is None:
            segments.append([])
        else:
            segments[-1].append(item)
    # A1111 emits no window for a trailing empty segment ("a BREAK"), but does for inner ones.
    if len(segments) > 1 and not "".join(t for t, _ in segments[-1]).strip():
        segments.pop()
    return [_normalize_segment(segment) for segment in segments]


def check_prompt(text: str) -> None:
    """Refuse A1111 prompt syntax this studio does not implement, naming the construct and the fix."""
    tag = _RE_EXTRA_NETWORK.search(text)
    if tag is not None:
        raise InputError(
            f"Prompt {text!r} contains the A1111 extra-network tag {tag.group(0)!r}; this studio does not "
            "read <lora:...> or other <kind:...> tags from the prompt.",
            fix="remove the tag and load LoRAs with --lora NAME:WEIGHT or a style preset's loras.",
        )
    for fragment, construct in _bracket_constructs(text):
        syntax = "[from:to:when]" if construct == "prompt editing" else "[a|b]"
        raise InputError(
            f"Prompt {text!r} uses A1111 {construct} {fragment!r} ({syntax}), which this studio does not "
            "support.",
            fix="write the words you want without it, or escape the brackets as \\[ and \\] to keep "
            "them as text.",
        )
    joined = _RE_AND.search(text)
    if joined is not None:
        start, end = max(joined.start() - 20, 0), joined.end() + 20
        raise InputError(
            f"Prompt {text!r} uses A1111 composable diffusion ('AND' in {text[start:end]!r}), which this "
            "studio does not support.",
            fix="write 'and' in lower case, or a comma, instead of AND; BREAK starts a new 77-token window.",
        )


def _bracket_constructs(text: str) -> list[tuple[str, str]]:
    """The ``[...]`` groups of ``text`` that A1111 reads as prompt editing or alternation, innermost first."""
    found: list[tuple[str, str]] = []
    # open brackets: (bracket, start, positions of its own top-level ':' and of its '|')
    frames: list[tuple[str, int, list[int], list[int]]] = []
    escaped = False
    for position, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "([":
            frames.append((char, position, [], []))
        elif char in ":|" and frames:
            frames[-1][2 if char == ":" else 3].append(position)
        elif char in ")]" and frames and frames[-1][0] == _OPENING[char]:
            bracket, start, colons, pipes = frames.pop()
            if bracket != "[":
                continue
            fragment = text[start : position + 1]
            if pipes:
                found.append((fragment, "alternation"))
            elif colons and _RE_NUMBER.fullmatch(text[colons[-1] + 1 : position].strip()):
                found.append((fragment, "prompt editing"))
    return found


def _parse_attention(text: str) -> list[list]:
    """A1111's ``parse_prompt_attention`` loop; BREAK is a marker that weights never touch."""
    res: list[list] = []  # [text | None, weight]
    round_brackets: list[int] = []
    square_brackets: list[int] = []
    for match in _RE_ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            start = round_brackets.pop()
            _multiply_range(res, start, _parse_weight(weight, res[start:], text))
        elif token == ")" and round_brackets:
            _multiply_range(res, round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_brackets:
            _multiply_range(res, square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append([None, 1.0])
                res.append([part, 1.0])
    # unbalanced opening brackets apply to the rest of the text
    for start in round_brackets:
        _multiply_range(res, start, ROUND_BRACKET_MULTIPLIER)
    for start in square_brackets:
        _multiply_range(res, start, SQUARE_BRACKET_MULTIPLIER)
    return res


def _multiply_range(res: list[list], start: int, multiplier: float) -> None:
    """Multiply the weights of ``res[start:]`` in place, skipping BREAK markers."""
    for item in res[start:]:
        if item[0] is not None:
            item[1] *= multiplier


def _parse_weight(number: str, inside: list[list], prompt: str) -> float:
    """Read an explicit ``(text:number)`` weight; refuse unreadable or negative numbers."""
    target = "".join(t for t, _ in inside if t is not None)
    try:
        weight = float(number)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise InputError(
            f"Prompt weight {number!r} on {target!r} in {prompt!r} is not a usable weight; "
            "expected a finite number >= 0 such as (word:1.2).",
            fix="write weights like (word:1.2) or (word:0.8); put unwanted concepts in the negative prompt.",
        )
    return weight


def _normalize_segment(items: list[list]) -> list[Fragment]:
    """Merge adjacent equal weights (as A1111), drop empty texts, check every weight."""
    merged: list[list] = []
    for text, weight in items:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    fragments = [Fragment(text, float(weight)) for text, weight in merged if text]
    for fragment in fragments:
        if not math.isfinite(fragment.weight) or fragment.weight < 0:
            raise InputError(
                f"Prompt fragment {fragment.text!r} ends up with weight {fragment.weight}; "
                "expected a finite weight >= 0.",
                fix="use smaller weights or less nesting, e.g. (word:1.5).",
            )
    return fragments or [Fragment("", 1.0)]


# ---------------------------------------------------------------- templates


def fill_template(template: str, variables: Mapping[str, str]) -> str:
    """Fill ``{name}`` placeholders of a prompt template; ``{{`` and ``}}`` are literal braces."""
    pieces = _parse_template(template)  # (literal text, placeholder name | None)
    names = [name for _, name in pieces if name is not None]
    missing = [name for name in dict.fromkeys(names) if name not in variables]
    if missing:
        given = ", ".join(sorted(variables)) or "none"
        raise InputError(
            f"Prompt template {template!r} needs {', '.join(missing)} but no value was given "
            f"(given: {given}).",
            fix="pass " + " ".join(f"--var {name}=VALUE" for name in missing) + ", e.g. --var age=30.",
        )
    return "".join(literal + (str(variables[name]) if name is not None else "") for literal, name in pieces)


def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """Split a template into literal text and plain placeholder names, refusing anything fancier."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InputError(
            f"Prompt template {template!r} has unbalanced braces ({err}).",
            fix="write literal braces as {{ and }}; placeholders look like {age}.",
        ) from err
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (spec or conversion or not _PLACEHOLDER_NAME.fullmatch(name)):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InputError(
                f"Prompt template {template!r} has placeholder {shown}; expected a plain name such as "
                "{age} (no format specs, conversions, attributes, indexes or positional fields).",
                fix="use {name} placeholders only; write literal braces as {{ and }}.",
            )
        pieces.append((literal, name))
    return pieces
