"""Node errors: the node input (or file) they concern, named once, the reason and the fix, in full. No ComfyUI import."""

from __future__ import annotations

import re


def fail(where: str, error: Exception, fix: str = "") -> ValueError:
    """The ValueError a node raises (ComfyUI shows its text on the node): ``"<where>: <reason> <fix>"``.

    ``where`` names the node input(s) the reason concerns (``"timesteps"``, ``"r_embedder x.safetensors"``,
    ``"prompt / class_labels / steps"``); it is left out when the reason already starts with one of those inputs (the
    library's errors name their argument: ``"timesteps must be strictly decreasing"``). Nothing is cut: lists and
    echoed inputs are shortened where the reason is written, so the fix at the end always arrives."""
    reason = str(error)
    message = reason if names_input(reason, where) else f"{where}: {reason}"
    return ValueError(f"{message} {fix}" if fix else message)


def names_input(reason: str, where: str) -> bool:
    """Whether ``reason`` starts with an input named in ``where`` (each part's first word; parts separated by
    ``", "`` or ``" / "``), as a whole word. An empty ``where`` names nothing, so nothing is added."""
    if not where:
        return True
    names = {part.split()[0] for part in re.split(r", | / ", where) if part.strip()}
    return any(re.match(rf"{re.escape(name)}(?![\w.])", reason) for name in names)
