"""A griffe extension for the docs build: the reStructuredText bits of the docstrings, in Markdown.

The library's docstrings name other objects the Sphinx way (``:class:`Foo```, ``:func:`~pkg.mod.bar```), which
Markdown would show literally: they become code spans (``~`` keeps the last dotted component, as in Sphinx).
A simple reST table (rows between two ``====  ====`` rules) becomes a Markdown list, one row per item.
"""
from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")
_RULE = r"=+(?: +=+)+"
_TABLE = re.compile(rf"^({_RULE})\n(.*?)\n{_RULE}$", re.M | re.S)


def _code_span(match: re.Match) -> str:
    tilde, target = match.groups()
    name = target.rsplit(".", 1)[-1] if tilde else target
    return f"`{name}`"


def _table_as_list(match: re.Match) -> str:
    rule, body = match.groups()
    starts = [m.start() for m in re.finditer("=+", rule)]
    items = []
    for row in body.splitlines():
        cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        items.append(f"- {cells[0]}: {' '.join(cells[1:])}")
    return "\n".join(items)


class RstRoles(griffe.Extension):
    """Rewrite each docstring once, when griffe loads the object that holds it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _TABLE.sub(_table_as_list, obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_code_span, text)
