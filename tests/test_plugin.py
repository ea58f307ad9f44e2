"""timm_dst.integrations.timm: the DST flag group, the sparsifier from parsed arguments, the checkpoint layout."""
from __future__ import annotations

import argparse
import io

import pytest
import timm
import torch
from conftest import make_tiny, train_steps

import timm_dst
from timm_dst.integrations import timm as plugin
from timm_dst.integrations.timm import (
    DST_KEY,
    add_dst_args,
    create_sparsifier_from_args,
    load_plain_state_dict,
    pack_checkpoint,
    read_dst_state,
    restore_dst_state,
    sparsifier_kwargs,
    validate_dst_args,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='train.py')
    parser.add_argument('--seed', type=int, default=42)
    add_dst_args(parser)
    return parser


def _errors(argv: list[str]) -> str | None:
    args = _parser().parse_args(argv)
    found = []
    validate_dst_args(args, found.append)
    return found[0] if found else None


def test_flag_group_kwargs():
    args = _parser().parse_args(['--dst', 'dsr', '--sparsity', '0.8', '--sparse-init', 'ER', '--mask-init',
                                 'magnitude', '--update-interval', '5', '--update-end', '0.75',
                                 '--update-milestones', '0:5', '10:20', '--dsr-np', '100',
                                 '--dst-kwargs', 'prune_rate=0.3'])
    assert args.dst == 'dsr'
    assert sparsifier_kwargs(args) == {
        'sparsity': 0.8, 'distribution': 'er', 'mask_init': 'magnitude', 'update_interval': 5, 'update_end': 0.75,
        'update_milestones': [(0, 5), (10, 20)], 'dsr_np': 100, 'prune_rate': 0.3, 'seed': 42}
    # nothing set: the method's defaults apply (only the seed is passed); --dst-seed wins over --seed
    args = _parser().parse_args(['--dst-seed', '7'])
    assert args.dst == 'rigl-itop' and sparsifier_kwargs(args) == {'seed': 7}


def test_every_method_flag_is_offered():
    opts = plugin.dst_option_strings()
    for dest in (a.dest for a in timm_dst.method_arguments()):
        assert '--' + dest.replace('_', '-') in opts
    assert opts['--sparsity'] == 1 and opts['--dense-classifier'] == 0 and opts['--include'] == -1


@pytest.mark.parametrize('argv, needle', [
    (['--dst', 'nope'], "--dst 'nope' is not a known method; accepted: dense"),
    (['--sparsity', '1.0'], '--sparsity 1.0 is out of range'),
    (['--prune-rate', '2'], '--prune-rate 2.0 must lie in [0, 1]'),
    (['--update-end', '1.5'], '--update-end 1.5: a float is a fraction'),
    (['--update-interval', '0'], '--update-interval 0 must be a positive'),
    (['--dst', 'set', '--dsr-np', '3'], '--dsr-np is an option of dsr, not of --dst set'),
    (['--dst', 'lth', '--lth-trained-state', '/no/such/file'], "--lth-trained-state '/no/such/file': no such file"),
])
def test_validation_names_the_flag(argv, needle):
    assert needle in _errors(argv)


def test_valid_flags_pass():
    assert _errors(['--dst', 'set-itop', '--sparsity', '0.95', '--update-end', '0.8']) is None


def test_deferred_total_steps():
    model, x, y = make_tiny('cnn')
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = _parser().parse_args(['--dst', 'rigl-itop', '--update-interval', '2', '--update-end', '0.5'])
    sp = create_sparsifier_from_args(model, opt, args, defer_total_steps=True)  # cosine decay needs the run length
    with pytest.raises(RuntimeError, match='set_total_steps'):
        train_steps(model, opt, x, y, 1)
    sp.set_total_steps(8)
    assert (sp.schedule.end, sp.prune_rate_end, sp.total_steps) == (4, 4, 8)
    train_steps(model, opt, x, y, 6)
    assert sp.step == 6 and len(sp.history) == 1 + 2  # updates after steps 2 and 4, none after the end
    with pytest.raises(ValueError, match='total_steps'):
        sp.set_total_steps(0)


def _sparse_run(steps: int = 4):
    model, x, y = make_tiny('cnn')
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, 'rigl-itop', sparsity=0.9, update_interval=2, total_steps=8)
    train_steps(model, opt, x, y, steps)
    return model, opt, sp, x, y


def test_checkpoint_layout_round_trip():
    model, opt, sp, x, y = _sparse_run()
    ckpt = pack_checkpoint({'epoch': 1, 'state_dict': model.state_dict(), 'optimizer': opt.state_dict(),
                            'args': argparse.Namespace(model='test_resnet')}, sp)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(buf, weights_only=True)
    # plain timm weights, strict-loadable into a fresh model, zeros included
    fresh = timm.create_model('test_resnet', num_classes=10)
    fresh.load_state_dict(loaded['state_dict'], strict=True)
    for t in sp.targets:  # zero wherever the mask is off (grown weights may be zero too)
        assert not loaded['state_dict'][t.name][~t.mask].any()
    state = read_dst_state(loaded)
    assert state['method'] == 'rigl-itop' and state['step'] == 4 and state['itop_rate'] == sp.itop_rate
    # a second run of the same configuration continues exactly from it
    model.eval()
    out = model(x)
    model2, _, _ = make_tiny('cnn', seed=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sp2 = timm_dst.create_sparsifier(model2, opt2, 'rigl-itop', sparsity=0.9, update_interval=2, total_steps=8)
    restore_dst_state(sp2, state, rng=False)  # masks first, then the plain weights under them
    load_plain_state_dict(model2, loaded['state_dict'])
    opt2.load_state_dict(loaded['optimizer'])
    assert sp2.step == 4 and sp2.itop_rate == sp.itop_rate
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(sp.targets, sp2.targets))
    model2.eval()
    torch.testing.assert_close(model2(x), out)
    model.train()
    model2.train()
    train_steps(model, opt, x, y, 2)
    train_steps(model2, opt2, x, y, 2)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(sp.targets, sp2.targets))
    assert sp2.itop_rate == sp.itop_rate


def test_dense_checkpoint_has_no_dst_state():
    model, _, _ = make_tiny('cnn')
    assert read_dst_state({'state_dict': model.state_dict(), 'epoch': 0}) is None
    with pytest.raises(ValueError, match=DST_KEY):
        read_dst_state({DST_KEY: {'step': 3}})


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = plugin.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    plugin.set_rng_state(torch.load(buf, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


@pytest.mark.parametrize('method', ['set', 'rigl', 'set-itop', 'snfs', 'dsr', 'gmp', 'static', 'dense'])
def test_every_method_state_loads_weights_only(method):
    """The DST state of each method (its own state included) survives ``torch.load(weights_only=True)``."""
    model, x, y = make_tiny('cnn')
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = {'update_end': 4} if method == 'gmp' else {}
    sp = timm_dst.create_sparsifier(model, opt, method, sparsity=0.8, update_interval=2, total_steps=8, **kw)
    train_steps(model, opt, x, y, 3)
    buf = io.BytesIO()
    torch.save(pack_checkpoint({'state_dict': model.state_dict()}, sp), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded[DST_KEY]['sparsifier']['step'] == (0 if method == 'dense' else 3)  # dense counts no steps
