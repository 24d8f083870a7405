"""Griffe extensions for the API reference (mkdocs.yml loads them; nothing here is part of the package).

- ``MappedSubpackages``: pyproject's ``package-dir`` installs ``training/`` as ``onestep_pipelines.training``;
  griffe reads the source tree, where that folder sits beside the package, so it is grafted in here.
- ``GroupedArguments``: the diffusers docstring style documents several arguments in one item
  (``shift (`float`, defaults to 1.0), base_shift (`float`, ...): the schedule``), which the Google parser
  cannot split. Each such item becomes one item per argument, sharing the description, so every argument is shown;
  ``(`int`, defaults to 1000)`` becomes ``(int)`` (the default column comes from the signature), and Sphinx roles
  (``:class:`X```) become inline code.
"""

from __future__ import annotations

import re

import griffe

MAPPED = {"onestep_pipelines": {"training": "training"}}
SECTIONS = ("Args:", "Arguments:", "Parameters:", "Params:", "Attributes:")
ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|obj|exc):`~?([^`]+)`")  # Sphinx roles -> inline code


class MappedSubpackages(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        for name, folder in MAPPED.get(pkg.name, {}).items():
            if name not in pkg.members:
                pkg.set_member(name, loader.load(folder))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _top_level(text: str, char: str) -> list[int]:
    """Positions of ``char`` outside parentheses, brackets and backticks."""
    found, depth, code = [], 0, False
    for i, c in enumerate(text):
        if c == "`":
            code = not code
        elif code:
            continue
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == char and depth == 0:
            found.append(i)
    return found


def _items(lines: list[str], i: int, section: int) -> tuple[list[list], int]:
    """The items of an argument section starting at ``lines[i]``: ``[indent, header, body lines]`` each, where the
    header runs to the colon after the names (over several lines when the names do), and a line at the items' indent
    with no such colon continues the item before it (a description wrapped too far left)."""
    items = []
    while i < len(lines) and lines[i].strip() and _indent(lines[i]) > section:
        indent, header = _indent(lines[i]), lines[i].strip()
        i += 1
        while not _top_level(header, ":") and i < len(lines) and lines[i].strip() and _indent(lines[i]) >= indent:
            header += " " + lines[i].strip()
            i += 1
        body = []
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > indent:
            body.append(lines[i])
            i += 1
        if not _top_level(header, ":") and items:
            items[-1][2].extend([" " * (items[-1][0] + 4) + header, *body])
        else:
            items.append([indent, header, body])
    return items, i


def _plain_type(name: str) -> str:
    """``shift (`float`, defaults to 1.0)`` -> ``shift (float)``: the default column comes from the signature, and
    griffe reads a type only when it is the whole parenthesis."""
    if not name.endswith(")") or "(" not in name:
        return name
    head, inner = name[: name.index("(")].rstrip(), name[name.index("(") + 1 : -1]
    cuts = [-1, *_top_level(inner, ","), len(inner)]
    parts = [inner[a + 1 : b].strip() for a, b in zip(cuts, cuts[1:])]
    kept = [p for p in parts if not re.fullmatch(r"(\*?optional\*?|defaults? (to )?.*)", p)]
    if len(kept) > 1:
        return name  # more than a type (``*optional*, one per training timestep``): keep it as written
    return f"{head} ({kept[0].strip('`')})" if kept else head


def split_grouped_arguments(text: str) -> str:
    """Rewrite every argument item that names several arguments as one item per argument."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.strip() not in SECTIONS:
            continue
        items, i = _items(lines, i, _indent(line))
        for indent, header, body in items:
            colons = _top_level(header, ":")
            names = header[: colons[0]] if colons else header
            commas = _top_level(names, ",")
            if colons and not commas:
                header = _plain_type(names.strip()) + header[colons[0] :]
            if not colons or not commas:
                out.append(" " * indent + header)
                out.extend(body)
                continue
            description = " ".join([header[colons[0] + 1 :].strip(), *(b.strip() for b in body)]).strip()
            bounds = [-1, *commas, len(names)]
            for a, b in zip(bounds, bounds[1:]):
                out.append(" " * indent + _plain_type(names[a + 1 : b].strip()) + ": " + description)
    return "\n".join(out)


class GroupedArguments(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = split_grouped_arguments(ROLE.sub(r"`\1`", obj.docstring.value))
