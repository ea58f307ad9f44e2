"""Methods as plugins: typed registry entries, the entry-point group ``timm_dst.methods``, the CLI derived from the
registry, and the closed method contract (hooks the controller calls, hooks it removes)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_dst
from timm_dst.methods import SparseMethod, _registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip('tomli')

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / 'examples' / 'timm_dst_mest'
TINY = [
    '--dataset', 'synthetic', '--input-size', '1', '6', '6', '--num-classes', '4', '--synthetic-train-size', '128',
    '--synthetic-test-size', '32', '--val-fraction', '0.25', '--model', 'itop_mlp', '--model-kwargs',
    'hidden=[48,32]', '-b', '32', '--lr', '0.05', '--sparsity', '0.8', '--no-progress', '--threads', '1',
]


def install_distribution(target: Path, project: Path) -> None:
    """Install a plugin project as ``pip install --no-deps --target`` would lay it out, without pip or a network:
    its packages, and a ``.dist-info`` whose ``entry_points.txt`` comes from the project's ``pyproject.toml``."""
    cfg = tomllib.loads((project / 'pyproject.toml').read_text())
    meta = cfg['project']
    for pkg in cfg['tool']['setuptools']['packages']:
        shutil.copytree(project / pkg, target / pkg, ignore=shutil.ignore_patterns('__pycache__'))
    write_dist_info(target, meta['name'], meta['version'], meta['entry-points'])


def write_dist_info(target: Path, name: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
    info = target / f'{name.replace("-", "_")}-{version}.dist-info'
    info.mkdir(parents=True)
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    (info / 'entry_points.txt').write_text(''.join(
        f'[{group}]\n' + ''.join(f'{k} = {v}\n' for k, v in eps.items()) + '\n' for group, eps in entry_points.items()))


def _env(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(path)] + [p for p in [env.get('PYTHONPATH')] if p])
    env['OMP_NUM_THREADS'] = '1'
    return env


@pytest.fixture
def fresh_registry(monkeypatch):
    """The built-in registry, with plugins not loaded yet; restored afterwards."""
    monkeypatch.setattr(_registry, '_method_infos', dict(_registry._method_infos))
    monkeypatch.setattr(_registry, '_plugins_loaded', False)
    return _registry


# ---------------------------------------------------------------------------------------------------------------------
# typed entries
def test_builtin_entries_carry_capabilities():
    info = {n: timm_dst.get_method_info(n) for n in timm_dst.list_methods()}
    assert {'dense', 'static', 'set', 'rigl', 'snfs', 'dsr', 'snip', 'lth', 'gmp'} <= set(info)
    assert timm_dst.list_methods('rigl*') == ['rigl', 'rigl-itop'] and timm_dst.list_methods('x*') == []
    assert all(i.description and '\n' not in i.description for i in info.values())
    assert {n for n, i in info.items() if i.needs_init_data} >= {'snip', 'snip-set-itop'}
    assert {n for n, i in info.items() if i.has_dense_phase} >= {'lth', 'lth-set-itop'}
    assert info['lth'].dense_phase.dense_method == 'dense' and not info['dense'].attaches
    assert info['rigl'].uses_dense_grads and info['snfs'].uses_dense_grads and not info['set'].uses_dense_grads
    assert info['dsr'].moves_budget and info['snfs'].moves_budget and not info['rigl'].moves_budget
    assert not info['static'].explores and info['snip-set-itop'].explores
    assert info['rigl'].defaults['update_end'] == 0.75 and info['dsr'].arguments == (
        'dsr_np', 'dsr_threshold', 'dsr_tolerance')
    with pytest.raises(TypeError):
        info['rigl'].defaults['update_end'] = 1.0  # read-only
    with pytest.raises(ValueError, match="method='nope' is not known; accepted: dense"):
        timm_dst.get_method_info('nope')


def test_register_method_checks_its_input(fresh_registry):
    class Mine(SparseMethod):
        def __init__(self, mine_k: int = 3):
            self.k = mine_k

    class Declares(SparseMethod):
        init_data_arg = 'batches'

    timm_dst.register_method('mine', Mine, update_interval=7, mine_k=5, prune_rate_schedule='constant')
    assert timm_dst.get_method_info('mine').description == 'Mine'  # no docstring: the class name
    for args, kwargs, needle in [
        (('mine', Mine), {}, 'already registered'),
        (('Mine!', Mine), {}, 'lower-case'),
        (('other', nn.Linear), {}, 'not a timm_dst.methods.SparseMethod subclass'),
        (('other', Mine), {'mine_q': 1}, 'mine_q'),
        (('other', Declares), {}, "declares 'batches'"),
    ]:
        with pytest.raises(ValueError, match=needle):
            timm_dst.register_method(*args, **kwargs)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    sp = timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method='mine')
    assert sp.method.k == 5 and sp.schedule.interval == 7
    with pytest.raises(ValueError, match='unknown argument.*sparse_init.*accepted: .*mask_init'):
        timm_dst.create_sparsifier(nn.Linear(4, 4), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
                                   method='mine', sparse_init='random')


def test_method_arguments_from_signatures_and_docstrings():
    args = {a.dest: a for a in timm_dst.method_arguments()}
    assert args['dsr_np'].type is int and args['dsr_np'].methods == ('dsr',) and args['dsr_np'].flag == '--dsr-np'
    assert args['dsr_threshold'].type is float and args['dsr_threshold'].default == 1e-3
    assert args['gmp_global'].type is bool
    assert args['snip_batches'].path and args['lth_trained_state'].path and not args['snip_loss_fn'].path
    assert args['snip_num_batches'].methods == ('snip', 'snip-set-itop')
    assert args['lth_rewind_step'].cli_only and args['lth_rewind_step'].type is int
    assert not any(a.cli_only for d, a in args.items() if d != 'lth_rewind_step')
    assert 'tolerance of the feedback loop' in args['dsr_tolerance'].help  # from the Args: section
    controller = set(_registry._controller_params())
    assert not controller & set(args)


# ---------------------------------------------------------------------------------------------------------------------
# entry points
PLUGIN_MODULE = '''
import torch
from timm_dst import register_method
from timm_dst.methods import SparseMethod


class Grower(SparseMethod):
    """Grows where |w| of the dense weights was largest (a test plugin)."""


class Pair(SparseMethod):
    """Two names from one callable.

    Args:
        pair_share: Share of the drops regrown, in % (100% = all).
    """

    def __init__(self, pair_share: float = 100.0):
        self.share = pair_share


def register():
    register_method('pair-a', Pair, update_interval=5, prune_rate_schedule='constant')
    register_method('pair-b', Pair, update_interval=6, prune_rate_schedule='constant')
'''


def test_entry_point_forms_and_a_broken_plugin(tmp_path, monkeypatch, fresh_registry):
    (tmp_path / 'tdst_test_plugin.py').write_text(PLUGIN_MODULE)
    write_dist_info(tmp_path, 'tdst-test-plugin', '1.0', {'timm_dst.methods': {
        'grower': 'tdst_test_plugin:Grower',  # a SparseMethod subclass: registered under the entry point's name
        'pairs': 'tdst_test_plugin:register',  # a callable registering one or more names
    }})
    write_dist_info(tmp_path, 'tdst-broken-plugin', '1.0', {'timm_dst.methods': {
        'broken': 'tdst_no_such_module:register'}})
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        names = timm_dst.list_methods()
        timm_dst.list_methods()  # loaded once
    msgs = [str(w.message) for w in caught if 'plugin' in str(w.message)]
    assert len(msgs) == 1 and "'broken'" in msgs[0] and 'tdst-broken-plugin' in msgs[0], msgs
    assert {'grower', 'pair-a', 'pair-b', 'set'} <= set(names) and 'broken' not in names
    assert timm_dst.get_method_info('grower').description.startswith('Grows where')
    assert timm_dst.get_method_info('pair-b').defaults == {'update_interval': 6, 'prune_rate_schedule': 'constant'}
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    sp = timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method='pair-a')
    assert sp.method_name == 'pair-a' and sp.schedule.interval == 5
    # the CLI: plugin names and flags are in --help (a % in a docstring is text); another method's flag is refused
    from timm_dst.cli.config import create_parser, parse_args
    text = ' '.join(create_parser()[1].format_help().split())
    assert 'grower: Grows where' in text and '--pair-share' in text and 'in % (100% = all)' in text
    assert parse_args(['--dataset', 'synthetic', '--model', 'itop_mlp', '--dst', 'grower']).dst == 'grower'
    with pytest.raises(SystemExit) as e:
        parse_args(['--dataset', 'synthetic', '--model', 'itop_mlp', '--dst', 'pair-a', '--dsr-np', '5'])
    assert e.value.code == 2


def test_example_plugin_trains_through_the_cli(tmp_path):
    """The example distribution, installed into a temporary path (no timm-dst file edited), is listed by
    ``timm-dst-train --help``, trains with ``--dst mest`` and passes its own tests."""
    site = tmp_path / 'site'
    site.mkdir()
    install_distribution(site, EXAMPLE)
    env = _env(site)
    cli = [sys.executable, '-m', 'timm_dst.train']
    help_ = subprocess.run(cli + ['--help'], env=env, capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0, help_.stderr
    text = ' '.join(help_.stdout.split())
    assert 'mest: MEST (plugin): drop by |w| + lambda |g|' in text and '--mest-lambda' in text
    assert 'plugin' not in help_.stderr  # no warning
    out = tmp_path / 'run'
    run = subprocess.run(cli + TINY + ['--dst', 'mest', '--mest-lambda', '0.5', '--update-interval', '2',
                                       '--epochs', '2', '--output', str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    summary = json.loads((out / 'dst_summary.json').read_text())
    assert results['method'] == 'mest' and summary['density'] == pytest.approx(0.2, abs=0.01)
    assert summary['itop_rate'] > summary['density']  # it explored
    args = (out / 'args.yaml').read_text()
    assert 'dst: mest' in args and 'mest_lambda: 0.5' in args
    # the example's own tests, against the installed copy
    own = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(EXAMPLE / 'tests')],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert own.returncode == 0, own.stdout[-3000:]
    assert '2 passed' in own.stdout


# ---------------------------------------------------------------------------------------------------------------------
# the CLI knows no method by name; the library names agree
_ALLOWED = {  # quoted strings equal to a method name that are not method names: (file or None = any, text)
    ('flops.py', "'dense'"),  # the FLOPs dicts' dense count
    (None, "DENSE_PHASE_DIR = 'dense'"),  # a folder name
}


def test_no_method_name_outside_the_methods_and_the_registry():
    names = timm_dst.list_methods()
    alternatives = '|'.join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf'''['"]({alternatives})['"]''')
    found = []
    for path in sorted((ROOT / 'timm_dst').rglob('*.py')):
        rel = path.relative_to(ROOT / 'timm_dst')
        if rel.parts[0] == 'methods' or rel.name == '_registry.py':
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not any(f in (None, rel.name) and s in line for f, s in _ALLOWED):
                found.append(f'{rel}:{n}: {line.strip()}')
    assert not found, '\n'.join(found)
    text = '\n'.join(p.read_text() for p in (ROOT / 'timm_dst').glob('*.py'))
    assert 'SNIP_METHODS' not in text and 'LTH_METHODS' not in text


def test_cli_distribution_alias_and_mask_init(tmp_path):
    from timm_dst.cli.config import parse_args
    from timm_dst.integrations.timm import sparsifier_kwargs as dst_kwargs
    base = ['--dataset', 'synthetic', '--model', 'itop_mlp']
    for flag in ('--distribution', '--sparse-init'):
        kw = dst_kwargs(parse_args(base + [flag, 'ER', '--mask-init', 'magnitude']))
        assert kw['distribution'] == 'er' and kw['mask_init'] == 'magnitude' and 'sparse_init' not in kw
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('dataset: synthetic\nmodel: itop_mlp\nsparse_init: uniform\nmask-init: global-magnitude\n')
    kw = dst_kwargs(parse_args(['-c', str(cfg)]))
    assert kw['distribution'] == 'uniform' and kw['mask_init'] == 'global-magnitude'


def test_design_doc_is_what_the_code_cites():
    assert (ROOT / 'docs' / 'design.md').is_file()
    files = [p for d in ('timm_dst', 'tests', 'docs', 'benchmarks', 'examples') for p in (ROOT / d).rglob('*')
             if p.suffix in ('.py', '.md') and p.is_file()] + [ROOT / 'README.md']
    stale = [str(p.relative_to(ROOT)) for p in files if re.search(r'(?<![\w/])DESIGN(\.md| invariant)', p.read_text())]
    assert not stale, stale


# ---------------------------------------------------------------------------------------------------------------------
# the closed contract
class _Recorder(SparseMethod):
    """SET that records the order of the hooks the controller calls."""

    uses_dense_grads = True

    def __init__(self):
        self.calls: list[str] = []
        self.masked_at_prepare = None

    def init_masks(self, sp):
        self.calls.append('init_masks')
        return None

    def prepare(self, sp):
        self.calls.append('prepare')
        self.masked_at_prepare = hasattr(sp.targets[0].module, 'weight_mask')

    def on_step(self, sp):
        self.calls.append(f'on_step:{sp.has_dense_grads}')

    def before_update(self, sp):
        self.calls.append('before_update')
        self.grads = sp.dense_grads()

    def drop_counts(self, sp, rate):
        self.calls.append('drop_counts')
        return super().drop_counts(sp, rate)

    def after_update(self, sp):
        self.calls.append('after_update')


@pytest.fixture
def recorder(fresh_registry):
    timm_dst.register_method('recorder', _Recorder)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='recorder', sparsity=0.5, update_interval=2,
                                    prune_rate_schedule='constant')
    return model, opt, sp


def _step(model, opt):
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(5, 6)), torch.randint(0, 3, (5,))).backward()
    opt.step()


def test_hooks_in_contract_order(recorder):
    model, opt, sp = recorder
    m = sp.method
    assert m.calls == ['init_masks', 'prepare'] and m.masked_at_prepare is False
    _step(model, opt)  # step 1: no capture (the next update is after step 2)
    _step(model, opt)  # step 2: captured, then updated
    assert m.calls[2:] == ['on_step:False', 'on_step:True', 'before_update', 'drop_counts', 'after_update']
    assert not sp.has_dense_grads  # cleared after the update
    assert any(bool((g[~t.mask] != 0).any()) for g, t in zip(m.grads, sp.targets))  # dense: inactive positions too


def test_remove_detaches_every_hook():
    class Attn(nn.Module):  # a parent reading its child's weight (BEiT / EVA style): gets a refresh hook
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 8)

        def forward(self, x):
            return F.linear(x, self.qkv.weight)

    model = nn.Sequential(Attn(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n_pre = len(model[0]._forward_pre_hooks)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl', sparsity=0.5, update_interval=1, total_steps=10)
    assert len(model[0]._forward_pre_hooks) == n_pre + 1 and sp._capture_handles
    sp.remove()
    assert len(model[0]._forward_pre_hooks) == n_pre and not sp._capture_handles
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert sp.step == 0 and len(sp.history) == 1  # the step hook is gone too


def test_final_update_comes_from_the_schedule():
    """GMP reaches its final count at update_end off the ΔT grid through the schedule, not by calling update()."""
    from timm_dst.methods.gmp import GMP
    assert 'on_step' not in GMP.__dict__ and GMP.update_at_end
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = timm_dst.create_sparsifier(model, opt, method='gmp', sparsity=0.8, update_interval=3, update_end=7)
    updates = [s for s in range(1, 12) if sp.schedule.is_update_step(s)]
    assert updates == [3, 6, 7]
    for _ in range(8):
        _step_any(model, opt, 10, 4)
    assert sp.density == pytest.approx(0.2, abs=0.01)


def _step_any(model, opt, n_in, n_out):
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, n_in)), torch.randint(0, n_out, (4,))).backward()
    opt.step()
