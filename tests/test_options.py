"""The controller's options are declared once (issue #26, timm_dst.core.options): the CLI's DST flags,
create_sparsifier's keywords, the resume rules and the library's defaults all come from the declaration."""
from __future__ import annotations

import argparse
import inspect

import pytest
import torch
import torch.nn as nn

import timm_dst
from timm_dst.core.controller import Sparsifier
from timm_dst.core.options import OPTIONS, cli_options, get_option, option_names
from timm_dst.integrations.timm import add_dst_args, flags, sparsifier_kwargs
from timm_dst.methods import _registry

# Sparsifier keywords that are not options: the objects it controls, and the name create_sparsifier passes itself
NOT_OPTIONS = {'self', 'model', 'optimizer', 'method', 'method_name'}
# the flags of the group that are not controller options: the method, the free-form keywords, the methods' own
OTHER_FLAGS = {'dst', 'dst_kwargs'}


def _controller_flags() -> dict[str, argparse.Action]:
    """The DST group's actions for controller options, by dest."""
    group = add_dst_args(argparse.ArgumentParser())
    own = {a.dest for a in timm_dst.method_arguments()}
    return {a.dest: a for a in group._group_actions if a.dest not in OTHER_FLAGS | own}


def test_cli_flags_and_create_sparsifier_keywords_derive_from_one_declaration():
    signature = inspect.signature(Sparsifier.__init__).parameters
    # create_sparsifier's controller keywords are the declared names, which are Sparsifier's keywords
    assert _registry._controller_params() == option_names() == set(signature) - NOT_OPTIONS
    # the CLI's flags are the declared flags (option strings, dests)
    flags_ = _controller_flags()
    assert {dest: tuple(a.option_strings) for dest, a in flags_.items()} == {
        o.dest: o.option_strings for o in cli_options()}
    # every flag set: sparsifier_kwargs gives exactly the declared names, and create_sparsifier takes them
    args = argparse.ArgumentParser()
    add_dst_args(args)
    ns = args.parse_args(['--sparsity', '0.8', '--structure', 'none', '--distribution', 'ER', '--mask-init',
                          'magnitude', '--update-interval', '3', '--prune-rate', '0.3', '--prune-rate-schedule',
                          'linear', '--prune-rate-min', '0.1', '--update-start', '2', '--update-end', '0.9',
                          '--update-milestones', '0:3', '--grow-unexplored-first', '--include', '*weight',
                          '--exclude', 'nothing', '--dense-first-layer', '--dense-classifier', '--remask-every-step',
                          '--sparse-kernel-density', '0', '--dst-seed', '7'])
    kw = sparsifier_kwargs(ns)
    assert set(kw) == {o.name for o in cli_options()}
    cli_names = {o.name for o in cli_options()}
    library_only = {o.name for o in OPTIONS if o.flag is None}
    assert cli_names | library_only == option_names() and not cli_names & library_only
    assert library_only == {'total_steps', 'defer_total_steps', 'max_nonfinite_steps'}
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    sp = timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method='set',
                                    total_steps=10, **kw)
    assert (sp.distribution, sp.mask_init, sp.schedule.interval, sp.seed) == ('er', 'magnitude', 3, 7)


def test_declared_defaults_are_the_controller_defaults_and_every_option_has_help():
    signature = inspect.signature(Sparsifier.__init__).parameters
    for o in OPTIONS:
        assert o.default == signature[o.name].default, o.name
        assert o.help_text() and '\n' not in o.help_text(), o.name
    for dest, action in _controller_flags().items():
        option = next(o for o in cli_options() if o.dest == dest)
        assert action.default is None  # unset: the method's registered default applies
        assert action.help == option.help_text().replace('%', '%%')
        if option.choices is not None:
            assert tuple(action.choices) == tuple(option.choices)
    assert tuple(get_option('distribution').choices) == ('erk', 'er', 'uniform')
    assert get_option('distribution').aliases == ('--sparse-init',)
    assert get_option('seed').flag == '--dst-seed' and get_option('seed').dest == 'dst_seed'


def test_resume_options_and_deprecated_names_are_derived():
    assert flags._RESUME_OPTIONS == (
        'update_interval', 'prune_rate', 'prune_rate_schedule', 'prune_rate_min', 'update_start', 'update_end',
        'update_milestones', 'grow_unexplored_first', 'remask_every_step', 'sparse_kernel_density')
    assert flags._NOT_RESUME_OPTIONS == {
        'seed', 'mask_init', 'sparsity', 'distribution', 'structure', 'include', 'exclude', 'dense_first_layer',
        'dense_classifier', 'total_steps', 'defer_total_steps'}
    assert not hasattr(flags, '_FLAG_TO_KWARG')
    from timm_dst.integrations.timm import DISTRIBUTIONS, MASK_INITS, PRUNE_RATE_SCHEDULES
    assert (tuple(DISTRIBUTIONS), MASK_INITS, tuple(PRUNE_RATE_SCHEDULES)) == (
        ('erk', 'er', 'uniform'), ('random', 'magnitude', 'global-magnitude'), ('cosine', 'constant', 'linear'))
    from timm_dst.core.controller import MASK_INITS as controller_mask_inits
    assert tuple(controller_mask_inits) == MASK_INITS


@pytest.mark.parametrize('argv, message', [
    (['--sparsity', '1.0'], '--sparsity 1.0 is out of range: give a float in [0, 1)'),
    (['--prune-rate', '1.5'], '--prune-rate 1.5 must lie in [0, 1]'),
    (['--update-end', '1.5'], '--update-end 1.5: a float is a fraction of training in [0, 1]'),
    (['--update-interval', '0'], '--update-interval 0 must be a positive number of optimizer steps'),
    (['--sparse-kernel-density', '2.0'], '--sparse-kernel-density 2.0 must lie in [0, 1]'),
])
def test_declared_range_checks(argv, message):
    parser = argparse.ArgumentParser()
    add_dst_args(parser)
    errors = []
    flags.validate_dst_args(parser.parse_args(argv), errors.append)
    assert errors == [message]
