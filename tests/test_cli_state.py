"""The state of a ``timm-dst-train`` run (issue #26): every attribute the CLI's functions read or set on a
:class:`~timm_dst.cli.state.RunState` is declared on it, and nothing undeclared can be set."""
from __future__ import annotations

import ast
import dataclasses
import os

import pytest

from timm_dst.cli import state as state_mod
from timm_dst.cli.state import RunState

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'timm_dst', 'cli')
GROUPS = {f.name: f.type for f in dataclasses.fields(RunState)}


def _fields(type_name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(getattr(state_mod, type_name))}


def _aliases(func: ast.AST) -> dict[str, str]:
    """Local names bound to a group of ``state`` (``setup, tr = state.setup, state.training``) -> the group."""
    out = {}
    for node in ast.walk(func):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) \
            else [(target, value)]
        for t, v in pairs:
            if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) \
                    and v.value.id == 'state' and v.attr in GROUPS:
                out[t.id] = v.attr
    return out


def _uses() -> list[tuple[str, str, str]]:
    """(where, group, attribute) of every ``state.<group>.<attribute>`` and ``<alias>.<attribute>`` in timm_dst/cli."""
    uses = []
    for name in sorted(os.listdir(CLI)):
        if not name.endswith('.py'):
            continue
        tree = ast.parse(open(os.path.join(CLI, name), encoding='utf-8').read())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef) or 'state' not in {a.arg for a in func.args.args}:
                continue
            aliases = _aliases(func)
            for node in ast.walk(func):
                if not isinstance(node, ast.Attribute):
                    continue
                where = f'{name}:{node.lineno}'
                if isinstance(node.value, ast.Name) and node.value.id == 'state':
                    uses.append((where, '', node.attr))
                elif isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name) \
                        and node.value.value.id == 'state' and node.value.attr in GROUPS:
                    uses.append((where, node.value.attr, node.attr))
                elif isinstance(node.value, ast.Name) and node.value.id in aliases:
                    uses.append((where, aliases[node.value.id], node.attr))
    return uses


def test_every_attribute_used_on_the_state_is_declared():
    uses = _uses()
    assert len(uses) > 100  # the scan sees the CLI's functions
    undeclared = [f'{where}: state.{group + "." if group else ""}{attr}' for where, group, attr in uses
                  if (attr not in GROUPS if not group else attr not in _fields(GROUPS[group]))]
    assert undeclared == []


def test_groups_refuse_undeclared_attributes():
    for group in ('RunSetup', 'RunData', 'RunTraining', 'RunPosition', 'RunResume', 'RunOutputs', 'RunState'):
        cls = getattr(state_mod, group)
        assert dataclasses.is_dataclass(cls) and hasattr(cls, '__slots__'), group
    pos = state_mod.RunPosition()
    pos.num_updates = 3
    with pytest.raises(AttributeError):
        pos.num_update = 3  # a typo cannot add state
    assert state_mod.RunPosition().meters is not pos.meters  # fresh meters per position
