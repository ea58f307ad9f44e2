"""Every flag of timm's own train.py (../shared/clients/timm/train.py) against timm-dst-train's parser: the same name,
dest, arity and default (or a documented different default), and either accepted or refused with a one-line reason
when given a value other than its default; a timm ``args.yaml`` is accepted by ``-c``."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import yaml

from timm_dst.cli.config import DEFAULTS_DIFFER, REFUSED, create_parser, flag_status, parse_args

TIMM_TRAIN = Path(__file__).resolve().parents[1].parent / 'shared' / 'clients' / 'timm' / 'train.py'
SYNTH = ['--dataset', 'synthetic', '--input-size', '1', '6', '6', '--num-classes', '4', '--model', 'itop_mlp']


@pytest.fixture(scope='module')
def timm_parser() -> argparse.ArgumentParser:
    if not TIMM_TRAIN.is_file():
        pytest.skip(f'{TIMM_TRAIN} is absent')
    spec = importlib.util.spec_from_file_location('_timm_train_script', TIMM_TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds `parser` / `config_parser` at import; runs no training
    return module.parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if a.dest != 'help'}


def _non_default_argv(action: argparse.Action) -> list[str]:
    """A command line giving ``action`` a value other than its default."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        value = next(str(c) for c in action.choices if c != action.default)
    elif action.type is int:
        value = '3'
    elif action.type is float:
        value = '0.25'
    else:
        value = 'resnet18'
    n = action.nargs if isinstance(action.nargs, int) else 1
    return [flag, *[value] * n]


def test_every_timm_flag_is_here_with_its_meaning(timm_parser):
    ours = _options(create_parser()[1])
    theirs = _options(timm_parser)
    assert len(theirs) >= 170
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f'timm train.py flags timm-dst-train does not accept: {missing}'
    for opt, a in theirs.items():
        b = ours[opt]
        assert b.dest == a.dest, opt
        assert b.nargs == a.nargs and (b.nargs != 0 or type(b) is type(a)), opt
        if a.type is not None and not isinstance(a.type, type(argparse.Action)):
            assert getattr(b.type, '__name__', b.type) == getattr(a.type, '__name__', a.type), opt
        if b.dest in DEFAULTS_DIFFER:
            assert b.default != a.default, f'{opt}: listed as a different default but equal'
        else:
            assert b.default == a.default, f'{opt}: default {b.default!r}, timm {a.default!r}'
    positional = [a for a in timm_parser._actions if not a.option_strings]
    assert [a.dest for a in positional] == ['data']
    assert any(a.dest == 'data' and not a.option_strings for a in create_parser()[1]._actions)


def test_every_flag_has_a_status(timm_parser):
    """Each flag is classified (docs/cli.md's column): as timm, DST, timm-dst-train's own, or refused with why."""
    _, ours = create_parser()
    for a in ours._actions:
        if a.dest in ('help', 'config'):
            continue
        status = flag_status(a)
        assert status.startswith(('as timm', 'DST', 'timm-dst-train', 'refused: ')), (a.dest, status)
    theirs = {a.dest for a in timm_parser._actions}
    assert set(REFUSED) <= theirs, 'only timm flags are refused'


def test_refused_flags_error_in_one_line(timm_parser, capsys):
    theirs = {a.dest: a for a in timm_parser._actions if a.option_strings}
    for dest, reason in REFUSED.items():
        argv = _non_default_argv(theirs[dest])
        with pytest.raises(SystemExit) as e:
            parse_args(SYNTH + argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert argv[0] in err and reason in err, (argv, err)


def test_refused_flags_at_their_defaults_pass(timm_parser):
    """timm's defaults of the refused flags (as an args.yaml holds them) are accepted."""
    theirs = {a.dest: a for a in timm_parser._actions if a.option_strings}
    args = parse_args(SYNTH + ['--device', 'cuda', '--kd-temperature', '4.0', '--naflex-max-seq-len', '576'])
    for dest in REFUSED:
        assert getattr(args, dest) == theirs[dest].default, dest


def test_timm_args_yaml_is_accepted(timm_parser, tmp_path, capsys):
    """An args.yaml written by timm's train.py runs: its values are honoured (timm's defaults included)."""
    timm_args = timm_parser.parse_args(['--mixup', '0.2', '--cutmix', '1.0'])
    cfg = tmp_path / 'args.yaml'
    cfg.write_text(yaml.safe_dump(vars(timm_args), default_flow_style=False))
    args = parse_args(['-c', str(cfg), *SYNTH])
    assert (args.epochs, args.opt, args.smoothing, args.mixup, args.cutmix) == (300, 'sgd', 0.1, 0.2, 1.0)
    assert args.lr is None and args.lr_base == 0.1  # timm's lr-base scaling applies
    # a key that would change the run and is not supported: named, one line
    data = vars(timm_args) | {'kd_model_name': 'resnet18', 'tta': 2}
    cfg.write_text(yaml.safe_dump(data, default_flow_style=False))
    with pytest.raises(SystemExit) as e:
        parse_args(['-c', str(cfg), *SYNTH])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert '--kd-model-name' in err[-1] and '--tta' in err[-1]


def test_positional_data_folder(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    args = parse_args([str(tmp_path), '--dataset', 'folder'])
    assert args.data_dir == str(tmp_path)


def test_lr_base_scaling():
    from timm_dst.cli.build import scale_lr
    args = parse_args(SYNTH + ['-b', '64'])
    scale_lr(args, global_batch_size=128)
    assert args.lr == pytest.approx(0.1 * 128 / 256)
    args = parse_args(SYNTH + ['--opt', 'adamw', '--lr-base', '0.004'])
    scale_lr(args, global_batch_size=64)
    assert args.lr == pytest.approx(0.004 * (64 / 256) ** 0.5)
    args = parse_args(SYNTH + ['--lr', '0.3'])
    scale_lr(args, global_batch_size=64)
    assert args.lr == 0.3


def test_docs_table_is_generated():
    """docs/cli.md's flag table is the generator's output (python -m timm_dst.cli.doc), so it cannot drift."""
    from timm_dst.cli.doc import flag_table
    doc = (Path(__file__).resolve().parents[1] / 'docs' / 'cli.md').read_text()
    assert flag_table() in doc, 'docs/cli.md is out of date: run python -m timm_dst.cli.doc'


@pytest.mark.parametrize('value', ['None', 'True', '3', '0.5', '1e-3', '[20, 16]', "'a'", '(1, 2)', 'gelu', 'x.y'])
def test_kwargs_values_read_as_timm_reads_them(value):
    """``--model-kwargs k=V`` gives the value timm's train.py gives (its ``ParseKwargs``: a Python literal, else the
    string), so a timm user's command line builds the same model (``a=None`` was the string 'None' before)."""
    import argparse

    from timm.utils import ParseKwargs as TimmParseKwargs

    from timm_dst.integrations.timm import ParseKwargs
    ours, theirs = argparse.ArgumentParser(), argparse.ArgumentParser()
    ours.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    theirs.add_argument('--model-kwargs', nargs='*', default={}, action=TimmParseKwargs)
    argv = ['--model-kwargs', f'k={value}']
    assert ours.parse_args(argv).model_kwargs == theirs.parse_args(argv).model_kwargs


def test_kwargs_yaml_words_beyond_timm():
    """What timm would keep as a string and YAML reads as a value: ``true`` / ``null`` (a bool method argument given
    as ``--dst-kwargs flag=true`` works)."""
    import argparse

    from timm_dst.integrations.timm import ParseKwargs
    p = argparse.ArgumentParser()
    p.add_argument('--kw', nargs='*', default={}, action=ParseKwargs)
    assert p.parse_args(['--kw', 'a=true', 'b=null', 'c=[a, b]']).kw == {'a': True, 'b': None, 'c': ['a', 'b']}
