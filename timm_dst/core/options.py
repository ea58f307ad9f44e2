"""The controller's options, declared once: name, type, default, choices, help, command-line flag.

Every keyword of :class:`~timm_dst.core.controller.Sparsifier` a user sets (all but the model, the optimizer, the
method object and its name) is one :class:`Option` in :data:`OPTIONS`. Derived from it:

* the keywords :func:`timm_dst.create_sparsifier` accepts for the controller (:func:`option_names`);
* the DST flags of :func:`timm_dst.integrations.timm.add_dst_args` (name, dest, aliases, converter, choices, metavar,
  help) and their range checks, and :func:`~timm_dst.integrations.timm.sparsifier_kwargs`;
* the options a ``--resume`` may change (:attr:`Option.resume`);
* docs/cli.md's flag table (generated from the parser) and the keys a recipe may use.

The defaults are the library's (``Sparsifier``'s signature); the flags default to None (unset: the method's
registered default applies). Choices that come from a registry (distributions, prune-rate schedules) are read when
the parser is built and when a value is checked, so registered plugins are offered.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..kernels.sparse_linear import DEFAULT_MAX_DENSITY
from .distributions import DISTRIBUTIONS
from .schedules import PRUNE_RATE_SCHEDULES
from .structure import structure_help

__all__ = ['Option', 'OPTIONS', 'MASK_INITS', 'get_option', 'option_names', 'cli_options', 'resume_options',
           'fixed_options', 'step_or_fraction', 'milestone']

#: How the initial active positions are picked when the method has no initial topology of its own.
MASK_INITS = ('random', 'magnitude', 'global-magnitude')


def step_or_fraction(value: str) -> int | float:
    """An int (optimizer step) or a float in [0, 1] (fraction of training)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def milestone(value: str) -> tuple[int, int]:
    """``FROM_STEP:INTERVAL`` as a tuple."""
    try:
        step, interval = value.split(':')
        return int(step), int(interval)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected FROM_STEP:INTERVAL, got {value!r}') from e


@dataclass(frozen=True)
class Option:
    """One controller option.

    Attributes:
        name: The keyword of ``Sparsifier`` and ``create_sparsifier`` (``'prune_rate'``).
        type: The value's type: ``float``, ``int``, ``str``, ``bool`` (a switch on the command line), or a tuple of
            them (``update_start``: ``(int, float)``); list-valued options give their items' type with ``nargs``.
        default: The library's default (the signature's).
        help: One line for ``--help`` and docs/cli.md (plain text: the flag group escapes argparse's ``%``), or a
            callable giving it when the parser is built (a text listing a registry); read it with :meth:`help_text`.
        flag: The command-line flag (``'--prune-rate'``); None for library-only options (``total_steps``, ...).
        aliases: Further option strings of the flag (``'--sparse-init'``, the ITOP code's name).
        choices: The accepted values: a tuple, a live sequence of a registry's names, or None (any value).
        convert: The flag's argparse ``type`` where it is not ``type`` (``str.lower``, :func:`step_or_fraction`,
            :func:`milestone`).
        metavar: The flag's metavar (None: argparse's).
        nargs: The flag's ``nargs`` (``'+'`` for list-valued options).
        resume: A resumed run may change it (the update schedule, the prune rate): recorded with checkpoints and
            reported when a resume changes it. The others are fixed by the checkpoint (the state check refuses a
            different sparsity, distribution, structure or set of sparse tensors; the initial topology is the
            checkpoint's).
        check: The flag's range check: ``check(value)`` returns what is wrong, as the text that follows
            ``'<flag> <value!r>'`` in the message, or None.
    """

    name: str
    type: type | tuple[type, ...]
    default: Any
    help: str | Callable[[], str]
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: Sequence[str] | None = None
    convert: Callable[[str], Any] | None = None
    metavar: str | None = None
    nargs: str | None = None
    resume: bool = False
    check: Callable[[Any], str | None] | None = None

    def help_text(self) -> str:
        """The help text, as of now (a registry's entries included)."""
        return self.help() if callable(self.help) else self.help

    @property
    def dest(self) -> str | None:
        """The flag's argparse ``dest`` (``'prune_rate'``, ``'dst_seed'``); None without a flag."""
        return self.flag[2:].replace('-', '_') if self.flag else None

    @property
    def option_strings(self) -> tuple[str, ...]:
        """The flag and its aliases (empty without a flag)."""
        return (self.flag, *self.aliases) if self.flag else ()

    @property
    def is_switch(self) -> bool:
        """A bool option: a ``store_true`` flag."""
        return self.type is bool


# range checks of the flags (the controller checks the library's keywords itself)
def _sparsity_range(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else ' is out of range: give a float in [0, 1)'


def _unit_interval(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else ' must lie in [0, 1]'


def _positive_steps(v: int) -> str | None:
    return None if v >= 1 else ' must be a positive number of optimizer steps'


def _fraction(v: int | float) -> str | None:
    return None if not isinstance(v, float) or 0.0 <= v <= 1.0 else ': a float is a fraction of training in [0, 1]'


_STEP_OR_FRACTION = dict(type=(int, float), convert=step_or_fraction, metavar='STEP|FRACTION', check=_fraction)

#: The controller's options, in the order of the command line's DST flags (library-only options last).
OPTIONS: tuple[Option, ...] = (
    Option('sparsity', float, None, flag='--sparsity', check=_sparsity_range,
           help='global sparsity in [0, 1) (default 0.9; with --structure N:M: 1 - N/M, the only value taken)'),
    Option('structure', str, None, flag='--structure', metavar='SPEC',
           help=lambda: f'structured sparsity kept by every method (docs/structured.md): {structure_help()}'),
    Option('distribution', str, 'erk', flag='--distribution', aliases=('--sparse-init',), choices=DISTRIBUTIONS,
           convert=str.lower,
           help='per-tensor density distribution (--sparse-init is the ITOP code\'s name; default erk)'),
    Option('mask_init', str, 'random', flag='--mask-init', choices=MASK_INITS,
           help='how the initial active positions are picked (default random)'),
    Option('update_interval', int, 100, flag='--update-interval', metavar='STEPS', resume=True, check=_positive_steps,
           help='ΔT: optimizer steps between topology updates (default: the method\'s)'),
    Option('prune_rate', float, 0.5, flag='--prune-rate', resume=True, check=_unit_interval,
           help='initial prune rate P (default: the method\'s)'),
    Option('prune_rate_schedule', str, 'cosine', flag='--prune-rate-schedule', choices=PRUNE_RATE_SCHEDULES,
           resume=True, help='prune-rate decay (default: the method\'s)'),
    Option('prune_rate_min', float, 0.0, flag='--prune-rate-min', resume=True,
           help='final prune rate of decaying schedules'),
    Option('update_start', default=0, flag='--update-start', resume=True, **_STEP_OR_FRACTION,
           help='the first topology update is at this optimizer step (int) or fraction of training (float), then one '
                'every ΔT (default: the first at step ΔT)'),
    Option('update_end', default=None, flag='--update-end', resume=True, **_STEP_OR_FRACTION,
           help='topology freezes after this optimizer step (int) or fraction of training (float)'),
    Option('update_milestones', tuple, None, flag='--update-milestones', convert=milestone, nargs='+',
           metavar='FROM_STEP:INTERVAL', resume=True,
           help='ΔT changes during training (DSR): FROM_STEP:INTERVAL updates at FROM_STEP, then every INTERVAL '
                'steps, e.g. 0:100 4875:200'),
    Option('grow_unexplored_first', bool, False, flag='--grow-unexplored-first', resume=True,
           help='SET+ (ITOP Appendix F): grow never-activated positions first'),
    Option('include', str, None, flag='--include', nargs='+', metavar='GLOB',
           help='parameter-name patterns of the sparse tensors (default: conv / linear weights)'),
    Option('exclude', str, None, flag='--exclude', nargs='+', metavar='GLOB',
           help='parameter-name patterns kept dense'),
    Option('dense_first_layer', bool, False, flag='--dense-first-layer', help='keep the first layer dense'),
    Option('dense_classifier', bool, False, flag='--dense-classifier', help='keep the classifier dense'),
    Option('remask_every_step', bool, None, flag='--remask-every-step', resume=True,
           help='re-apply masks after every optimizer step (automatic for optimizers that need it)'),
    Option('sparse_kernel_density', float, DEFAULT_MAX_DENSITY, flag='--sparse-kernel-density', metavar='D',
           resume=True, check=_unit_interval,
           help='plain nn.Linear layers at or below this density run CSR kernels on CPU in float32 (default 0.05; 0 = '
                'dense kernels everywhere)'),
    Option('seed', int, 0, flag='--dst-seed',
           help='seed of the sparsifier\'s generator (default: --seed; the same on every rank)'),
    # library-only: a training script passes these itself
    Option('total_steps', int, None,
           help='optimizer steps of the whole run (needed by fractional update_end and decaying schedules)'),
    Option('defer_total_steps', bool, False,
           help='the run\'s length is given later, through set_total_steps before the first optimizer step'),
    Option('max_nonfinite_steps', int, 20, resume=True,
           help='stop training when the sparse weights\' gradients are non-finite at this many checked steps in a row '
                '(None: never)'),
)

_BY_NAME = {o.name: o for o in OPTIONS}


def get_option(name: str) -> Option:
    """The declaration of option ``name``.

    Raises:
        KeyError: When no option is called ``name``.
    """
    return _BY_NAME[name]


def option_names() -> frozenset[str]:
    """Every option's name: the controller keywords :func:`timm_dst.create_sparsifier` accepts."""
    return frozenset(_BY_NAME)


def cli_options() -> tuple[Option, ...]:
    """The options with a command-line flag, in flag order."""
    return tuple(o for o in OPTIONS if o.flag)


def resume_options() -> tuple[str, ...]:
    """The flags' options a resume may change (recorded with checkpoints; a change is reported). Library-only options
    a resume may change (``max_nonfinite_steps``) are compared only when given through ``--dst-kwargs``."""
    return tuple(o.name for o in OPTIONS if o.resume and o.flag)


def fixed_options() -> frozenset[str]:
    """The options the checkpoint fixes: not compared when a resume gives them through ``--dst-kwargs``."""
    return frozenset(o.name for o in OPTIONS if not o.resume)
