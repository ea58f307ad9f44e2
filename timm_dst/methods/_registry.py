"""Method registry: typed entries (:class:`MethodInfo`), third-party methods from the entry-point group
``timm_dst.methods``, the methods' own arguments as CLI flags (:func:`method_arguments`) and the ``create_sparsifier``
factory (timm style).

Every name is registered once with :func:`register_method`; its :class:`MethodInfo` carries the class, the defaults,
a one-line description and the capabilities the CLI dispatches on (data batches at initialisation, a dense phase),
so that nothing outside a method's own file and this registry knows a method by name.

Third-party methods: a distribution declares entry points in the group ``timm_dst.methods``. Each entry point names
either a :class:`~timm_dst.methods.SparseMethod` subclass (registered under the entry point's name, no extra defaults)
or a callable taking no argument that registers one or more methods with :func:`register_method` when called. They are
loaded on the first use of the registry (:func:`list_methods`, :func:`get_method_info`, :func:`method_arguments`,
:func:`create_sparsifier`); a plugin that fails to load is skipped with one warning naming it.
"""
from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import re
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..core import _setup
from ..core.controller import Sparsifier
from ..core.method import DensePhase, ShardedMethodError, SparseMethod
from ..core.options import option_names

__all__ = [
    'MethodInfo', 'MethodArgument', 'ENTRY_POINT_GROUP', 'DEFAULT_METHOD', 'DEFAULT_TRAIN_METHOD', 'register_method',
    'list_methods', 'get_method_info', 'method_arguments', 'create_sparsifier', 'check_sparsifier_args',
    'list_sharded_methods',
]

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = 'timm_dst.methods'
DEFAULT_METHOD = 'rigl-itop'  # create_sparsifier's default
DEFAULT_TRAIN_METHOD = 'set-itop'  # timm-dst-train's default --dst (the ITOP paper's main method)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method name: its class, defaults, description and capabilities.

    Attributes:
        name: The public name (``'rigl-itop'``).
        cls: The :class:`~timm_dst.methods.SparseMethod` subclass.
        description: One line for listings and ``--help``.
        defaults: Defaults of :class:`~timm_dst.core.controller.Sparsifier` keywords and of the method's own keywords
            (read-only); the user's arguments override them.
        arguments: The method's own constructor keywords.
        attaches: Masks are attached (False only for a dense baseline).
        explores: The topology changes after initialisation.
        moves_budget: Per-tensor active counts may change during training (the total stays exact).
        uses_dense_grads: The method reads dense gradients of the sparse weights (captured on some backwards).
        init_data_arg: The keyword that takes data batches scored at initialisation (None: needs no data).
        dense_phase: How a dense phase feeds the method (None: no dense phase).
    """

    name: str
    cls: type
    description: str
    defaults: Mapping[str, Any]
    arguments: tuple[str, ...]
    attaches: bool
    explores: bool
    moves_budget: bool
    uses_dense_grads: bool
    init_data_arg: str | None
    dense_phase: DensePhase | None

    @property
    def needs_init_data(self) -> bool:
        """The initial topology is scored on data batches (SNIP-like)."""
        return self.init_data_arg is not None

    @property
    def has_dense_phase(self) -> bool:
        """The sparse run starts from a trained dense model (lottery-ticket-like)."""
        return self.dense_phase is not None


@dataclass(frozen=True)
class MethodArgument:
    """A method's own argument as a command-line flag (see :func:`method_arguments`).

    Attributes:
        dest: The keyword (and argparse ``dest``), e.g. ``'dsr_np'``.
        type: ``int``, ``float``, ``str`` or ``bool`` (a ``--x`` / ``--no-x`` switch).
        default: The default of the first method taking it (shown in help; the CLI's own default is None = unset).
        help: Help text: the argument's description from the method's docstring and the methods taking it (plain
            text: escape ``%`` as ``%%`` for argparse).
        methods: The method names taking it.
        path: A string value is a file path (a CLI checks that it exists).
        cli_only: Not a :func:`create_sparsifier` keyword but read by the CLI itself (a dense phase's rewind step).
    """

    dest: str
    type: type
    default: Any
    help: str
    methods: tuple[str, ...]
    path: bool = False
    cli_only: bool = False

    @property
    def flag(self) -> str:
        """The option string, ``'--dsr-np'``."""
        return '--' + self.dest.replace('_', '-')


_method_infos: dict[str, MethodInfo] = {}
_plugins_loaded = False


def _controller_params() -> frozenset[str]:
    """The controller keywords a user (or a method's registered defaults) may set: the declared options."""
    return option_names()


def _constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != 'self' and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _description(cls: type) -> str:
    doc = inspect.cleandoc(cls.__dict__.get('__doc__') or '')  # the class's own, not an inherited one
    return doc.split('\n', 1)[0].strip() or cls.__name__


def register_method(name: str, cls: type, *, description: str | None = None, **defaults: Any) -> type:
    """Register ``cls`` under ``name`` (one entry per name).

    Args:
        name: Public method name (``'rigl-itop'``): lower case, digits, ``-``, ``_`` or ``.``.
        cls: A :class:`~timm_dst.methods.SparseMethod` subclass; its class attributes are its capabilities.
        description: One line for listings and ``--help``; None = the first line of the class docstring.
        **defaults: Defaults for :class:`~timm_dst.core.controller.Sparsifier` keywords (``update_interval``, ...) and
            for the method's own constructor keywords; the user's arguments override them.

    Returns:
        ``cls`` (so it can decorate a class through ``functools.partial``).

    Raises:
        ValueError: When ``name`` is taken or malformed, ``cls`` is not a ``SparseMethod`` subclass, or a default
            names a keyword neither the controller nor the method takes.
    """
    if not isinstance(name, str) or not re.fullmatch(r'[a-z0-9][a-z0-9_.\-]*', name):
        raise ValueError(f'method name {name!r}: use lower-case letters, digits, "-", "_" or "."')
    if name in _method_infos:
        raise ValueError(f'method name {name!r} is already registered (by {_method_infos[name].cls.__module__})')
    if not (isinstance(cls, type) and issubclass(cls, SparseMethod)):
        raise ValueError(f'method {name!r}: cls={cls!r} is not a timm_dst.methods.SparseMethod subclass')
    own = _constructor_params(cls)
    unknown = sorted(set(defaults) - set(own) - _controller_params())
    if unknown:
        raise ValueError(f'method {name!r}: default(s) {", ".join(unknown)} are not keywords of the controller or '
                         f'of {cls.__name__}')
    phase = cls.dense_phase
    for arg in (cls.init_data_arg, phase.trained_state_arg if phase else None,
                phase.rewind_state_arg if phase else None):
        if arg is not None and arg not in own:
            raise ValueError(f'method {name!r}: {cls.__name__} declares {arg!r} but its constructor does not take it')
    _method_infos[name] = MethodInfo(
        name=name, cls=cls, description=description if description is not None else _description(cls),
        defaults=types.MappingProxyType(dict(defaults)), arguments=tuple(own), attaches=bool(cls.attaches),
        explores=bool(cls.explores), moves_budget=bool(cls.moves_budget), uses_dense_grads=bool(cls.uses_dense_grads),
        init_data_arg=cls.init_data_arg, dense_phase=phase)
    return cls


# ----------------------------------------------------------------------------------------------------------------
# third-party methods
def _load_plugins() -> None:
    """Load the entry points of the group ``timm_dst.methods`` (once); a failing one is skipped with a warning."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before loading: a plugin may call list_methods() itself
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, 'dist', None), 'name', None) or '?'
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, SparseMethod):
                register_method(ep.name, obj)
            elif callable(obj):
                obj()
            else:
                raise TypeError(f'{ep.value} is neither a SparseMethod subclass nor a callable')
        except Exception as e:  # noqa: BLE001  (a broken plugin must not break the others)
            warnings.warn(f'timm_dst: method plugin {ep.name!r} ({ep.value}, distribution {dist}) was skipped: '
                          f'{type(e).__name__}: {e}', RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# look-ups
def list_methods(filter: str = '') -> list[str]:
    """Registered method names (built-in and plugins), sorted; ``filter`` is a glob pattern."""
    _load_plugins()
    names = sorted(_method_infos)
    return [n for n in names if fnmatch.fnmatchcase(n, filter)] if filter else names


def get_method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of a registered name.

    Raises:
        ValueError: When ``name`` is not registered (the message lists the accepted names).
    """
    _load_plugins()
    if not isinstance(name, str) or name not in _method_infos:
        raise ValueError(f'method={name!r} is not known; accepted: {", ".join(list_methods())}')
    return _method_infos[name]


def _param_docs(cls: type) -> dict[str, str]:
    """``{argument: description}`` from the Google-style ``Args:`` sections of ``cls`` and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.cleandoc(klass.__dict__.get('__doc__') or '')
        lines = doc.splitlines()
        if 'Args:' not in lines:
            continue
        current, indent = None, None
        for line in lines[lines.index('Args:') + 1:]:
            if not line.strip():
                continue
            width = len(line) - len(line.lstrip())
            if width == 0:
                break
            indent = width if indent is None else indent
            m = re.match(r'\s*(\w+)(?:\s*\([^)]*\))?:\s*(.*)', line)
            if width == indent and m:
                current = m.group(1)
                out[current] = m.group(2).strip()
            elif current is not None:
                out[current] += ' ' + line.strip()
    return {k: v.replace('``', '').rstrip('.') for k, v in out.items()}


def _atoms(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(hint) for a in _atoms(arg)]
    return [typing.get_origin(hint) or hint]


def _argument_type(cls: type, pname: str, param: inspect.Parameter, default: Any) -> tuple[type, bool]:
    """(flag type, value may be a path) from the annotation (resolved when possible) and the default."""
    try:
        atoms = _atoms(typing.get_type_hints(cls.__init__).get(pname, Any))
        is_path = any(a is os.PathLike for a in atoms)
        names = {getattr(a, '__name__', '') for a in atoms}
    except Exception:  # noqa: BLE001  (an annotation that does not resolve: read its text)
        text = param.annotation if isinstance(param.annotation, str) else repr(param.annotation)
        is_path = 'PathLike' in text
        names = set(re.findall(r'\b(bool|int|float|str)\b', text))
    if isinstance(default, bool) or names == {'bool'} or names == {'bool', 'NoneType'}:
        return bool, False
    if default is not None and type(default) in (int, float, str):
        return type(default), is_path
    for t in (float, int):
        if t.__name__ in names:
            return t, is_path
    return str, is_path


def method_arguments() -> list[MethodArgument]:
    """The methods' own arguments as command-line flags, one per keyword (shared keywords list every method).

    The ``dest`` of each is a :func:`create_sparsifier` keyword except for ``cli_only`` ones (a dense phase's rewind
    step), which a CLI reads itself. A CLI adds each as ``flag`` with default None (unset: the method's default
    applies) and passes the set ones to :func:`create_sparsifier`; bool arguments are ``--x`` / ``--no-x`` switches.
    """
    _load_plugins()
    found: dict[str, dict[str, Any]] = {}
    for name in sorted(_method_infos):
        info = _method_infos[name]
        docs = _param_docs(info.cls)
        params = _constructor_params(info.cls)
        for pname, param in params.items():
            if pname in _controller_params():
                continue
            entry = found.get(pname)
            if entry is None:
                default = info.defaults.get(pname, None if param.default is inspect.Parameter.empty else param.default)
                typ, is_path = _argument_type(info.cls, pname, param, default)
                entry = found[pname] = dict(dest=pname, type=typ, default=default, doc=docs.get(pname, ''),
                                            methods=[], path=is_path, cli_only=False)
            entry['methods'].append(name)
        if info.dense_phase is not None:
            arg = info.dense_phase.rewind_step_arg
            doc = (f'without --{info.dense_phase.trained_state_arg.replace("_", "-")}: the dense phase saves its '
                   'weights at this optimizer step as the rewind point (0 = the initialisation)')
            entry = found.setdefault(arg, dict(dest=arg, type=int, default=0, doc=doc, methods=[], path=False,
                                               cli_only=True))
            entry['methods'].append(name)
    out = []
    for e in found.values():
        doc = e.pop('doc')
        help_ = f'{doc} ' if doc else ''
        help_ += f'[--dst {" / ".join(e["methods"])}; default {e["default"]!r}]'
        out.append(MethodArgument(help=help_, methods=tuple(e.pop('methods')), **e))
    return out


# ----------------------------------------------------------------------------------------------------------------
# factory
def _split_kwargs(info: MethodInfo, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ctrl_params, method_params = _controller_params(), set(info.arguments)
    ctrl = {k: v for k, v in kwargs.items() if k in ctrl_params}
    meth = {k: v for k, v in kwargs.items() if k in method_params}
    unknown = sorted(set(kwargs) - set(ctrl) - set(meth))
    if unknown:
        accepted = ', '.join(sorted(ctrl_params | method_params))
        raise ValueError(f'unknown argument(s) {", ".join(unknown)} for method {info.name!r}; accepted: {accepted}')
    return ctrl, meth


def create_sparsifier(model: nn.Module, optimizer: Any, method: str = DEFAULT_METHOD, **kwargs: Any) -> Sparsifier:
    """Make ``model`` sparse and keep it so while ``optimizer`` steps.

    Args:
        model: Any model (timm or not). Call before ``accelerator.prepare`` / ``torch.compile`` / EMA creation.
        optimizer: Its optimizer (plain torch or wrapped, e.g. by Accelerate).
        method: A registered name, see :func:`list_methods`.
        **kwargs: :class:`~timm_dst.core.controller.Sparsifier` keywords (``sparsity``, ``distribution``, ``mask_init``,
            ``update_interval``, ``total_steps``, ``prune_rate``, ``prune_rate_schedule``, ``update_end``,
            ``grow_unexplored_first``, ``include``, ``exclude``, ``seed``, ...) and the method's own
            (``dsr_np``, ``snfs_momentum``, ...). Values left out take the method's registered defaults.

    Returns:
        The :class:`~timm_dst.core.controller.Sparsifier`, already attached.
    """
    if not isinstance(method, str):
        raise ValueError(f'method={method!r} must be a name; accepted: {", ".join(list_methods())}')
    info = get_method_info(method)
    ctrl, meth = _split_kwargs(info, {**info.defaults, **kwargs})
    try:
        return Sparsifier(model, optimizer, info.cls(**meth), method_name=method, **ctrl)
    except ShardedMethodError as e:
        raise ValueError(f'{e}; the methods starting from mask_init are: {", ".join(list_sharded_methods())}') \
            from None


def list_sharded_methods() -> list[str]:
    """The methods that train a model sharded with FSDP2 (``fully_shard``): those that start from ``mask_init``
    (the others choose their initial topology themselves, ``init_masks``, which is not supported on shards)."""
    return [n for n in list_methods() if get_method_info(n).cls.init_masks is SparseMethod.init_masks]


def check_sparsifier_args(method: str = DEFAULT_METHOD, provided: tuple[str, ...] = (), **kwargs: Any) -> None:
    """Check :func:`create_sparsifier`'s arguments without a model (a front end's refusal before it builds one).

    Runs the checks of :func:`create_sparsifier` that need no model: the method name, unknown keywords, the method's
    constructor (its own argument checks and required inputs), the controller's option checks and the update schedule
    (``update_start`` / ``update_end`` / ``update_milestones``; fractions wait for ``total_steps`` when it is neither
    given nor ``defer_total_steps``). What needs the model (the sparse tensors, the initial topology, a method's
    ``init_masks``) is checked when the sparsifier attaches.

    Args:
        method: A registered name.
        provided: Method keywords a front end supplies itself later (a placeholder stands for them here).
        **kwargs: As for :func:`create_sparsifier`.

    Raises:
        ValueError: The first problem found, in one line.
    """
    if not isinstance(method, str):
        raise ValueError(f'method={method!r} must be a name; accepted: {", ".join(list_methods())}')
    info = get_method_info(method)
    ctrl, meth = _split_kwargs(info, {**info.defaults, **kwargs})
    for name in provided:
        if name in info.arguments and meth.get(name) is None:
            meth[name] = os.devnull  # a stand-in: the constructors only keep their inputs
    try:
        instance = info.cls(**meth)
    except TypeError as e:
        raise ValueError(f'method {method!r}: {e}') from None
    params = inspect.signature(Sparsifier.__init__).parameters
    full = {n: p.default for n, p in params.items()
            if n not in ('self', 'model', 'optimizer', 'method') and p.default is not inspect.Parameter.empty}
    full.update(ctrl)
    full.pop('method_name', None)
    o = _setup.checked_options(nn.Module(), instance, full)
    pending = bool(o.get('defer_total_steps')) and o['total_steps'] is None
    _setup.make_schedule(instance, o, o['total_steps'], pending, o.get('update_milestones'))
    start, end = o['update_start'], o['update_end']
    if pending and isinstance(start, float) and isinstance(end, float) and end < start:
        raise ValueError(f'update_end={end!r} comes before update_start={start!r} (fractions of training): no update '
                         'could ever run')
