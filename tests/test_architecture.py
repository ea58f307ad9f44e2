"""The package's layout (issue #26): layers that import only downwards, no import circle, small definitions.

Every import counts: module level, inside functions and under ``TYPE_CHECKING`` alike (a function-level import is a
tie all the same). docs/design.md ("Layers") draws the same table.
"""
from __future__ import annotations

import ast
import os
from collections.abc import Iterable

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'timm_dst')

# layer of each subpackage: a module may import its own subpackage and lower layers only
LAYERS = {
    'kernels': 0, 'distributed': 0, 'models': 0,
    'core': 1,
    'methods': 2,
    'integrations': 3,
    'cli': 4, 'tools': 4,
}
# the top-level modules and the subpackages they may import
TOP_LEVEL = {
    '__init__': {'core', 'methods', 'models', 'kernels', '_compat'},
    '_compat': set(),
    'run': {'integrations'},
    'train': {'cli'},
    'zoo': {'tools', '_compat'},
}
MAX_TOP_LEVEL = 12
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 100


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def package_sources() -> dict[str, tuple[str, str]]:
    """module name -> (path, source) of every module of timm_dst."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith('.py'):
                p = os.path.join(folder, f)
                with open(p, encoding='utf-8') as fh:
                    out[_module_name(p)] = (p, fh.read())
    return out


def imports_of(module: str, path: str, source: str) -> set[str]:
    """The timm_dst modules (or packages) one module imports, at any depth, relative imports resolved."""
    is_pkg = path.endswith('__init__.py')
    base = module.split('.') if is_pkg else module.split('.')[:-1]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split('.')[0] == 'timm_dst')
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                target = '.'.join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.split('.')[0] != 'timm_dst':
                continue
            if node.module:
                out.add(target)
            out.update(f'{target}.{a.name}' for a in node.names)  # `from . import x` may name a module
    return out


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The module an imported name belongs to (``timm_dst.core.masks.DSTMask`` -> ``timm_dst.core.masks``)."""
    modules = set(modules)
    while name and name not in modules:
        name = name.rpartition('.')[0]
    return name or None


def import_graph(sources: dict[str, tuple[str, str]]) -> dict[str, set[str]]:
    graph = {}
    for mod, (path, src) in sources.items():
        targets = {_resolve(t, sources) for t in imports_of(mod, path, src)}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def _place(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else '__init__'


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        src = _place(mod)
        for t in targets:
            dst = _place(t)
            if dst == src or t == 'timm_dst':
                if t == 'timm_dst' and mod != 'timm_dst':
                    bad.append(f'{mod} imports the package facade timm_dst (import the module that defines the name)')
                continue
            if src in LAYERS and (dst not in LAYERS or LAYERS[dst] >= LAYERS[src]):
                bad.append(f'{mod} (layer {LAYERS[src]}) imports {t} ({dst}: layer {LAYERS.get(dst, "top level")})')
            elif src not in LAYERS and dst not in TOP_LEVEL.get(src, set()):
                bad.append(f'{mod} (top level) imports {t}, which it may not')
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def oversized(sources: dict[str, tuple[str, str]]) -> list[str]:
    bad = []
    for mod, (_, src) in sources.items():
        for node in ast.walk(ast.parse(src)):
            n = getattr(node, 'end_lineno', 0) - getattr(node, 'lineno', 0) + 1
            if isinstance(node, ast.ClassDef) and n > MAX_CLASS_LINES:
                bad.append(f'class {mod}.{node.name}: {n} lines')
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION_LINES:
                bad.append(f'function {mod}.{node.name}: {n} lines')
    return sorted(bad)


@pytest.fixture(scope='module')
def sources():
    return package_sources()


def test_layers_import_only_downwards(sources):
    assert layer_violations(import_graph(sources)) == []


def test_no_import_circle(sources):
    assert circles(import_graph(sources)) == []


def test_no_oversized_class_or_function(sources):
    assert oversized(sources) == []


def test_top_level_is_small(sources):
    top = sorted(m for m in sources if m.count('.') == 1 and m.split('.')[1] not in LAYERS)
    assert len(top) + 1 <= MAX_TOP_LEVEL, top  # + the package's __init__
    assert set(m.split('.')[1] for m in top) <= set(TOP_LEVEL)


def test_the_checks_catch_what_they_look_for():
    """The checks above fail on an upward import, a circle, an oversized function and the facade import."""
    fake = {
        'timm_dst.core.a': ('a.py', 'from ..cli import x\nfrom . import b\n'),
        'timm_dst.core.b': ('b.py', 'def f():\n    from .a import y\n' + '    y()\n' * 120),
        'timm_dst.cli': ('cli/__init__.py', 'x = 1\n'),
        'timm_dst.methods.m': ('m.py', 'import timm_dst\n'),
        'timm_dst': ('__init__.py', ''),
    }
    graph = import_graph(fake)
    violations = layer_violations(graph)
    assert any('timm_dst.core.a (layer 1) imports timm_dst.cli' in v for v in violations), violations
    assert any('timm_dst.methods.m imports the package facade' in v for v in violations), violations
    assert circles(graph) == [['timm_dst.core.a', 'timm_dst.core.b']]
    assert oversized(fake) == ['function timm_dst.core.b.f: 122 lines']


def test_tier_table_names_real_tests():
    """A new test module is unit-tier unless conftest's TIERS says otherwise: every TIERS key names a real test."""
    import conftest
    tests = os.path.dirname(os.path.abspath(__file__))
    modules = {f[:-3] for f in os.listdir(tests) if f.startswith('test_') and f.endswith('.py')}
    for key in conftest.TIERS:
        module, _, name = key.partition('::')
        assert module in modules, key
        if name:
            with open(os.path.join(tests, module + '.py'), encoding='utf-8') as f:
                assert f'def {name}(' in f.read(), key


def test_design_doc_names_every_module(sources):
    """docs/design.md's layout (section 1) names every module of the package (methods/ and models/ as folders: one
    file per method / architecture), so that the map cannot fall behind the code."""
    import re
    with open(os.path.join(os.path.dirname(PKG), 'docs', 'design.md'), encoding='utf-8') as f:
        doc = f.read()
    missing = []
    for path, _ in sources.values():
        rel = os.path.relpath(path, PKG).replace(os.sep, '/')
        if rel.endswith('__init__.py') or rel.split('/')[0] in ('methods', 'models'):
            continue
        stem = rel.rsplit('/', 1)[-1][:-3]
        if rel not in doc and not re.search(r'[`/ ]' + re.escape(stem) + r'[`.\s,)]', doc):
            missing.append(rel)
    assert not missing, f'docs/design.md does not name {missing}'
    assert '`methods/`' in doc and '`models/`' in doc
