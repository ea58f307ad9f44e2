"""The DST flag group and the sparsifier from parsed arguments, for any timm-style training script.

:func:`add_dst_args` adds ``--dst``, ``--sparsity``, ... (declared once, in :mod:`timm_dst.core.options`) and every
registered method's own flags; :func:`validate_dst_args` checks them in one line each; :func:`sparsifier_kwargs`
turns them into ``create_sparsifier`` keywords; :func:`create_sparsifier_from_args` and :func:`begin_training` attach
the sparsifier and start its schedule. The checkpoint layout is :mod:`.checkpoint`'s; :mod:`timm_dst.integrations.timm`
re-exports both (docs/timm-train.md shows the five-line diff of a train.py that uses them).
"""
from __future__ import annotations

import argparse
import ast
import copy
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from ...core.distributions import DISTRIBUTIONS as _DISTRIBUTIONS
from ...core.masks import _detach, _find_dst_mask
from ...core.options import MASK_INITS, Option, cli_options, fixed_options, milestone, resume_options, step_or_fraction
from ...core.schedules import PRUNE_RATE_SCHEDULES as _PRUNE_RATE_SCHEDULES
from ...core.structure import parse_structure, structure_forms
from ...methods._registry import (
    DEFAULT_METHOD,
    check_sparsifier_args,
    create_sparsifier,
    get_method_info,
    list_methods,
    method_arguments,
)
from .checkpoint import fill_outside_mask, read_dst_state, restore_dst_state, set_rng_state

__all__ = [
    'DISTRIBUTIONS', 'MASK_INITS', 'PRUNE_RATE_SCHEDULES', 'ParseKwargs', 'step_or_fraction', 'milestone',
    'add_dst_args', 'dst_option_strings', 'validate_dst_args', 'check_dst_values', 'sparsifier_kwargs',
    'dst_options', 'option_changes',
    'create_sparsifier_from_args', 'begin_training', 'accept_plain_weights',
]

# The choices of --distribution / --mask-init / --prune-rate-schedule, as they were named here (deprecated: read the
# registries, timm_dst.core.distributions.DISTRIBUTIONS and timm_dst.core.schedules.PRUNE_RATE_SCHEDULES, or the
# declarations of timm_dst.core.options). Live views: registered plugins are in them.
DISTRIBUTIONS = _DISTRIBUTIONS
PRUNE_RATE_SCHEDULES = _PRUNE_RATE_SCHEDULES


# --------------------------------------------------------------------------------------------------------------------
# flags
class ParseKwargs(argparse.Action):
    """``key=value`` pairs into a dict. A value is read as timm's ``ParseKwargs`` reads it, a Python literal (``3``,
    ``0.5``, ``None``, ``True``, ``[1, 2]``, ``'a'``), so a timm command line means the same here; what is not a
    literal is read as YAML (``true``, ``null``, ``[a, b]``, a bare word as a string)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = dict(getattr(namespace, self.dest) or {})
        for item in values:
            if '=' not in item:
                parser.error(f'{option_string}: expected key=value, got {item!r}')
            key, value = item.split('=', 1)
            try:
                kw[key] = ast.literal_eval(value)
                continue
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass
            try:
                kw[key] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                parser.error(f'{option_string} {item!r}: the value of {key} is not valid YAML '
                             f'({" ".join(str(getattr(e, "problem", "") or e).split())})')
        setattr(namespace, self.dest, kw)


def add_dst_args(
        parser: argparse.ArgumentParser,
        default_method: str | None = None,
        title: str = 'Dynamic sparse training',
) -> argparse._ArgumentGroup:
    """Add the DST flags (``--dst``, ``--sparsity``, ``--update-interval``, ... and every registered method's own
    flags) to ``parser`` as one argument group; returns the group.

    Every flag but ``--dst`` defaults to None (= the method's registered default), so :func:`sparsifier_kwargs` passes
    on only what the user set.

    Args:
        parser: An ``argparse.ArgumentParser`` (timm's train.py parser, for instance).
        default_method: The ``--dst`` default (None: the registry's ``DEFAULT_METHOD``).
        title: Title of the argument group in ``--help``.
    """
    g = parser.add_argument_group(title)
    methods = '; '.join(f'{n}: {get_method_info(n).description}' for n in list_methods())
    g.add_argument('--dst', type=str, default=default_method or DEFAULT_METHOD, metavar='METHOD',
                   help=f'sparse training method, one of: {methods}'.replace('%', '%%'))
    for option in cli_options():  # the controller's options (timm_dst.core.options)
        _add_option(g, option)
    g.add_argument('--dst-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='further keyword arguments for timm_dst.create_sparsifier')
    for arg in method_arguments():
        help_ = arg.help.replace('%', '%%')  # argparse formats help with %
        if arg.type is bool:
            g.add_argument(arg.flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            g.add_argument(arg.flag, type=arg.type, default=None, help=help_,
                           metavar='FILE' if arg.path else arg.type.__name__.upper())
    return g


def _add_option(group: argparse._ArgumentGroup, option: Option) -> None:
    """The flag of one controller option, default None (unset); choices are read from their registry now."""
    kw: dict[str, Any] = dict(default=None, help=option.help_text().replace('%', '%%'))  # argparse formats help with %
    if option.is_switch:
        kw['action'] = 'store_true'
    else:
        kw['type'] = option.convert or (option.type if isinstance(option.type, type) else str)
        for key in ('choices', 'metavar', 'nargs'):
            if getattr(option, key) is not None:
                kw[key] = tuple(option.choices) if key == 'choices' else getattr(option, key)
    group.add_argument(*option.option_strings, **kw)


def dst_option_strings() -> dict[str, int]:
    """Every option string of the :func:`add_dst_args` flags (``'--sparsity'``, ...) and how many values it takes
    (0: a switch; -1: one or more)."""
    p = argparse.ArgumentParser(add_help=False)
    out = {}
    for a in add_dst_args(p)._group_actions:
        n = 0 if a.nargs == 0 else (-1 if a.nargs in ('+', '*') else int(a.nargs or 1))
        for opt in a.option_strings:
            out[opt] = n
    return out


def validate_dst_args(args: argparse.Namespace, error: Callable[[str], Any]) -> None:
    """Check the DST flags; ``error`` (e.g. ``parser.error``) gets one message naming the flag and what is accepted.

    Args:
        args: Parsed arguments holding the :func:`add_dst_args` flags.
        error: Called with the message of the first problem found (expected not to return).
    """
    if args.dst not in list_methods():
        return error(f'--dst {args.dst!r} is not a known method; accepted: {", ".join(list_methods())}')
    for option in cli_options():  # the declared range checks, in flag order
        value = getattr(args, option.dest, None)
        problem = option.check(value) if option.check is not None and value is not None else None
        if problem:
            return error(f'{option.flag} {value!r}{problem}')
    if getattr(args, 'structure', None) is not None:
        try:
            structure = parse_structure(args.structure)
        except ValueError:
            hint = (" (YAML reads an unquoted N:M such as 2:4 as a base-60 number: quote it, structure: '2:4')"
                    if str(args.structure).strip().isdigit() else '')
            return error(f'--structure {args.structure!r} is not accepted{hint}; accepted: {structure_forms()}')
        nm = structure.density if structure is not None else None
        if nm is not None and args.sparsity is not None and abs(args.sparsity - (1 - nm)) > 1e-9:
            return error(f'--structure {structure.spec} fixes the sparsity at {1 - nm:g} (at most {structure.n} of '
                         f'every {structure.m} weights active): give --sparsity {1 - nm:g} or leave --sparsity out '
                         f'(got {args.sparsity:g})')
    for arg in method_arguments():  # a method's own flags: only for a method that takes them; paths must exist
        value = getattr(args, arg.dest, None)
        if value is not None and args.dst not in arg.methods:
            return error(f'{arg.flag} is an option of {", ".join(arg.methods)}, not of --dst {args.dst}')
        if arg.path and isinstance(value, str) and value and not os.path.isfile(value):
            return error(f'{arg.flag} {value!r}: no such file')
    return None


def check_dst_values(args: argparse.Namespace, error: Callable[[str], Any], provided: tuple[str, ...] = (),
                     total_steps: int | None = None) -> None:
    """Check the DST values that need no model, before a model is built (after :func:`validate_dst_args`): the
    ``--dst-kwargs`` keys, the method's own arguments and required inputs, the controller's options and the update
    schedule, through :func:`timm_dst.methods._registry.check_sparsifier_args` (the checks of ``create_sparsifier``).

    Args:
        args: Parsed arguments holding the :func:`add_dst_args` flags.
        error: Called with one message (``--dst METHOD: ...``) for the first problem found (expected not to return).
        provided: Method keywords the front end supplies itself later (SNIP's batches from its loader, ...).
        total_steps: The run's optimizer steps when known; None: given later (fractions are resolved then).
    """
    kw = sparsifier_kwargs(args)
    if total_steps is not None:
        kw.setdefault('total_steps', total_steps)
    else:
        kw.setdefault('defer_total_steps', True)
    try:
        check_sparsifier_args(args.dst, provided=provided, **kw)
    except (ValueError, TypeError) as e:
        return error(f'--dst {args.dst}: {e}')
    return None


def sparsifier_kwargs(args: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments for :func:`timm_dst.create_sparsifier` from the DST flags: only what the user set (the
    method's defaults apply to the rest), plus the seed (``--dst-seed``, else ``seed``, else ``args.seed``, else 0).
    """
    kw = {o.name: getattr(args, o.dest) for o in cli_options()
          if o.name != 'seed' and getattr(args, o.dest, None) is not None}
    for arg in method_arguments():
        if not arg.cli_only and getattr(args, arg.dest, None) is not None:
            kw[arg.dest] = getattr(args, arg.dest)
    if getattr(args, 'dst_seed', None) is not None:
        kw['seed'] = args.dst_seed
    else:
        kw['seed'] = seed if seed is not None else int(getattr(args, 'seed', 0) or 0)
    kw.update(getattr(args, 'dst_kwargs', None) or {})
    return kw


# The DST options a resume may change: the schedule of the updates still to come and the methods' own settings
# (timm_dst.core.options: Option.resume). What else differs is refused when the state is loaded (method, sparsity,
# distribution, structure, the sparse tensors: --include / --exclude / --dense-*); the initial topology (--mask-init,
# the seed) is the checkpoint's.
_RESUME_OPTIONS = resume_options()
_NOT_RESUME_OPTIONS = fixed_options()


def _plain_value(value: Any) -> Any:
    """Tuples as lists, recursively (a value as a checkpoint stores and compares it); None if not plain data."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        items = [_plain_value(v) for v in value]
        return None if any(v is None and o is not None for v, o in zip(items, value)) else items
    return None


def dst_options(args: argparse.Namespace) -> dict[str, Any]:
    """The values in effect for the DST options a resume may change (the update schedule, the prune rate and its
    decay, the methods' own settings other than initial data and files): the flag (or ``--dst-kwargs`` entry) where
    given, else the method's registered default, else the default of the controller or of the method's class.

    Plain values only: they are stored in checkpoints and compared by :func:`option_changes`.

    Args:
        args: Parsed arguments holding the :func:`add_dst_args` flags (a checkpoint's ``args`` too).
    """
    import inspect

    info = get_method_info(args.dst)
    own = {a.dest for a in method_arguments()
           if args.dst in a.methods and not a.path and not a.cli_only and a.dest != info.init_data_arg}
    defaults: dict[str, Any] = {o.name: o.default for o in cli_options() if o.name in _RESUME_OPTIONS}
    for name, param in inspect.signature(info.cls.__init__).parameters.items():
        if name in own and param.default is not inspect.Parameter.empty:
            defaults[name] = param.default
    schedule = set(_RESUME_OPTIONS) if info.explores else set()  # a fixed topology has no updates to come
    keep = schedule | own | (set(getattr(args, 'dst_kwargs', None) or {}) - _NOT_RESUME_OPTIONS)
    values = {**defaults, **info.defaults, **sparsifier_kwargs(args, seed=0)}
    return {k: _plain_value(v) for k, v in values.items() if k in keep and (v is None or _plain_value(v) is not None)}


def _show_option(value: Any) -> str:
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, list):
        return ' '.join(':'.join(map(str, v)) if isinstance(v, list) else str(v) for v in value) or '[]'
    if isinstance(value, float):
        return f'{value:g}'
    return 'none' if value is None else str(value)


def option_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """What a resume changes, in one line: ``--update-interval 500 (the checkpoint was trained with 1000); ...``, or
    ``''`` when nothing differs or the checkpoint does not say (``old`` None: saved before options were stored).

    Args:
        old: :func:`dst_options` of the run that wrote the checkpoint.
        new: :func:`dst_options` of the resumed run.
    """
    if not isinstance(old, Mapping):
        return ''
    flags = dst_option_strings()
    parts = []
    for key, value in new.items():
        if key not in old or _plain_value(old[key]) == value:
            continue
        flag = '--' + key.replace('_', '-')
        name = flag if flag in flags else f'--dst-kwargs {key}'
        parts.append(f'{name} {_show_option(value)} (the checkpoint was trained with {_show_option(old[key])})')
    return '; '.join(parts)


def create_sparsifier_from_args(model: nn.Module, optimizer: Any, args: argparse.Namespace,
                                total_steps: int | None = None, resume: str | None = None, **overrides: Any):
    """:func:`timm_dst.create_sparsifier` with the method and keywords of the parsed DST flags.

    Call it after the optimizer exists (and after a ``--resume`` has loaded) and before the EMA copy, DDP and
    ``torch.compile``. When the run's length is known only later (timm's scheduler set-up), leave ``total_steps`` None
    and call :func:`begin_training` once it is.

    With ``resume`` (the checkpoint train.py resumed from), a checkpoint holding a DST state continues it exactly
    (masks, explored masks, step, generators, method state; the resumed weights and optimizer state are kept); a
    dense one starts sparse training from its weights. The state read is left in ``sparsifier.resume_state``. Plain
    timm weights load into the sparse model (and its EMA copy) afterwards: ``load_state_dict`` maps ``x`` to
    ``x_orig`` and keeps the masks.

    Args:
        model: The model to sparsify.
        optimizer: Its optimizer.
        args: Parsed arguments holding the :func:`add_dst_args` flags.
        total_steps: Optimizer steps of the whole run, when known.
        resume: Checkpoint the weights were resumed from, if any.
        **overrides: Further :func:`timm_dst.create_sparsifier` keywords (win over the flags).

    Raises:
        ValueError: Bad DST settings, or a checkpoint whose DST state does not match them.
    """
    kw = sparsifier_kwargs(args)
    kw.update(overrides)
    if total_steps is not None:
        kw['total_steps'] = total_steps
    else:
        kw.setdefault('defer_total_steps', True)
    state = read_dst_state(resume) if resume else None
    snapshot = None
    if state is not None:  # attaching draws a topology and zeroes around it: keep the resumed values
        snapshot = ([(p, p.detach().clone()) for p in model.parameters()], copy.deepcopy(optimizer.state_dict()),
                    {id(m): list(m._parameters) for m in model.modules()})
    sp = create_sparsifier(model, optimizer, method=args.dst, **kw)
    if snapshot is not None:
        with torch.no_grad():
            for p, v in snapshot[0]:  # the same parameter objects (masked ones are now <name>_orig)
                p.copy_(v)
        optimizer.load_state_dict(snapshot[1])
        try:
            restore_dst_state(sp, state, rng=False)
        except ValueError:  # a refused state: the model and optimizer go back to what the resume loaded
            _undo_attach(sp, model, optimizer, snapshot)
            raise
    sp.resume_state = state
    if sp.method.attaches:
        accept_plain_weights(sp, (state or {}).get('ema_outside_mask'))
    return sp


@torch.no_grad()
def _undo_attach(sp: Any, model: nn.Module, optimizer: Any, snapshot: tuple) -> None:
    """Take a just-created sparsifier off ``model`` again: its hooks and masks removed (not folded), parameters in
    their order with the ``snapshot`` values, the optimizer state as it was. The sparsifier is detached."""
    sp.remove()
    for t, dst_mask in zip(sp.targets, sp._dst_masks):
        dst_mask.install_sparse_kernels(t.module, 0.0, 0)  # 0: the module's own forward back
        _detach(t.module, t.param_name, dst_mask)
    sp._detached = True
    params, optimizer_state, orders = snapshot
    for module in model.modules():
        order = orders.get(id(module))
        if order is not None and list(module._parameters) != order:
            current = dict(module._parameters)
            module._parameters.clear()
            module._parameters.update((k, current[k]) for k in order if k in current)
            module._parameters.update((k, v) for k, v in current.items() if k not in order)
    for p, v in params:
        p.copy_(v)
    optimizer.load_state_dict(optimizer_state)


def begin_training(sparsifier: Any, total_steps: int, start_step: int | None = None,
                   restore_rng: bool = True) -> None:
    """After the scheduler set-up, right before the training loop: the run's optimizer steps, and on a resume the
    random states of the saving process (single-process runs: data order and augmentation then continue exactly).

    Args:
        sparsifier: From :func:`create_sparsifier_from_args`.
        total_steps: Optimizer steps of the whole run (timm: ``num_epochs * updates_per_epoch``).
        start_step: Optimizer steps already done by a run resumed from a dense checkpoint (timm:
            ``start_epoch * updates_per_epoch``), so topology updates follow timm's count. Ignored when the DST state
            was restored (it holds the step).
        restore_rng: Restore the resumed checkpoint's random states (one process only: a multi-process run saved
            rank 0's alone).
    """
    sparsifier.set_total_steps(total_steps)
    state = getattr(sparsifier, 'resume_state', None)
    if state is None and start_step:
        sparsifier.step = int(start_step)
    ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if restore_rng and state is not None and state.get('rng') is not None and not ddp:
        set_rng_state(state['rng'])


def accept_plain_weights(sparsifier: Any, ema_outside_mask: Mapping[str, Any] | None = None) -> None:
    """Let ``load_state_dict`` of each masked module, and of its deep copies (timm's EMA), take plain timm weights:
    ``<name>`` goes into ``<name>_orig``, the mask is kept. timm's ``resume_checkpoint``, ``load_checkpoint`` and
    ``load_task_ema_checkpoint`` then load checkpoints in this layout into the sparse model. On a copy, the
    ``ema_outside_mask`` entries (:func:`outside_mask`) are written back."""
    by_module: dict[int, tuple[nn.Module, list[str], list[str]]] = {}
    for t in sparsifier.targets:
        entry = by_module.setdefault(id(t.module), (t.module, [], []))
        entry[1].append(t.param_name)
        entry[2].append(t.name)
    for module, names, full_names in by_module.values():
        hook = _PlainLoadHook(tuple(names), tuple(full_names), dict(ema_outside_mask or {}))
        if hasattr(module, 'register_load_state_dict_pre_hook'):
            module.register_load_state_dict_pre_hook(hook)
        else:  # torch < 2.3
            module._register_load_state_dict_pre_hook(hook, with_module=True)


class _PlainLoadHook:
    """``load_state_dict`` pre-hook of a masked module (see :func:`accept_plain_weights`)."""

    def __init__(self, names: tuple[str, ...], full_names: tuple[str, ...], outside: dict[str, Any]):
        self.names, self.full_names, self.outside = names, full_names, outside

    def __deepcopy__(self, memo: dict) -> _PlainLoadHook:  # copies (the EMA) share the resumed entries
        return _PlainLoadHook(self.names, self.full_names, self.outside)

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for name, full in zip(self.names, self.full_names):
            key = prefix + name
            if key in state_dict and key + '_orig' not in state_dict and hasattr(module, name + '_orig'):
                value = state_dict.pop(key)
                dst_mask = _find_dst_mask(module, name)
                if full in self.outside and dst_mask is not None and not dst_mask.owns(module):
                    value = fill_outside_mask(value, self.outside[full])
                state_dict[key + '_orig'] = value
                state_dict.setdefault(key + '_mask', getattr(module, name + '_mask'))


