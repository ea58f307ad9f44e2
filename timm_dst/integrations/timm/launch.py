"""The launcher's command line: the DST flags taken out of the arguments wherever they stand (:func:`split_argv`),
their parser (:func:`create_parser`), and the ``-c/--config`` YAML that train.py will read, checked before it runs
(:func:`read_train_config`)."""
from __future__ import annotations

import argparse

from ._report import PROG, fail
from .config import _coerce, read_yaml_config
from .flags import add_dst_args, dst_option_strings

__all__ = ['create_parser', 'split_argv', 'read_train_config', 'RANK_MASKS_FLAG']

RANK_MASKS_FLAG = '--dst-rank-masks'  # the launcher's own flag, beside the DST flags


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the launcher's one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:
        fail(message)


def create_parser() -> argparse.ArgumentParser:
    """The launcher's parser: the DST flags only (train.py parses the rest)."""
    parser = _Parser(
        prog=PROG, allow_abbrev=False, add_help=False,
        usage=f'{PROG} PATH/TO/train.py [train.py arguments] [DST flags]   (or python -m timm_dst.run ...)',
        description='Run an unmodified timm train.py with dynamic sparse training. The DST flags below may stand '
                    'anywhere after the script; every other argument goes to train.py as it is. '
                    '`%(prog)s train.py --help` shows train.py\'s own flags after these. See docs/timm-train.md.')
    parser.add_argument('-h', '--help', action='store_true', help='show this help (and train.py\'s) and exit')
    g = add_dst_args(parser)  # --dst defaults to the registry's DEFAULT_METHOD
    g.add_argument(RANK_MASKS_FLAG, default=None, metavar='DIR',
                   help='each process writes its final masks and R_s to DIR/masks_rank<R>.pt (to check that the '
                        'ranks agree)')
    return parser


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Split the launcher's arguments into the script, train.py's arguments and the DST flags (with their values).

    DST flags match exactly (``--sparsity 0.9`` or ``--sparsity=0.9``); flags taking several values take the
    following arguments up to the next one starting with ``-``. The script is the first other argument ending in
    ``.py``.
    """
    opts = {**dst_option_strings(), RANK_MASKS_FLAG: 1}
    script, rest, dst = None, [], []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split('=', 1)[0] if tok.startswith('--') else tok
        if name in opts:
            dst.append(tok)
            n = opts[name]
            i += 1
            if '=' in tok:
                continue
            if n == -1:
                while i < len(argv) and not _is_flag(argv[i]):
                    dst.append(argv[i])
                    i += 1
            else:
                dst.extend(argv[i:i + n])
                i += n
            continue
        if script is None and not tok.startswith('-') and tok.endswith('.py'):
            script = tok
        else:
            rest.append(tok)
        i += 1
    return script, rest, dst


class _ConfigParser(argparse.ArgumentParser):
    """timm train.py's first parser (``-c/--config`` only), with errors as the launcher's one line."""

    def error(self, message: str) -> None:
        fail(f'-c/--config: {message}')


def read_train_config(rest: list[str], dst_parser: argparse.ArgumentParser) -> tuple[str, set[str]] | None:
    """Check the ``-c/--config`` YAML that train.py will read (found in its arguments as train.py's own first parser
    finds it), before train.py starts; its DST keys (``sparsity: 0.9``, ...) become the defaults of ``dst_parser``
    (the DST flags on the command line win). Returns the config's path and keys (None without a config).

    Refused in one line, exit status 2: no such file, unreadable, not valid YAML, not a mapping (an empty file
    included: train.py cannot read it), a key given twice (YAML keeps the last silently), a key with dashes
    (train.py's ``parser.set_defaults`` reads ``batch_size``; ``batch-size`` would be ignored), a DST value of the
    wrong type. Keys that are no flag of train.py are refused once train.py defines its flags
    (:meth:`Launcher.patched`).
    """
    config_parser = _ConfigParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    path = config_parser.parse_known_args(rest)[0].config
    if not path:
        return None
    cfg = read_yaml_config(path, fail)
    if not isinstance(cfg, dict):
        got = 'an empty file' if cfg is None else f'a {type(cfg).__name__}'
        fail(f'-c/--config {path}: expected a mapping of train.py flag names (with underscores) to values, got {got}')
    for key in cfg:
        if not isinstance(key, str):
            fail(f'-c/--config {path}: key {key!r} is not a flag name (keys are train.py\'s flag names)')
        if '-' in key:
            twin = key.lstrip('-').replace('-', '_')
            both = f'keys {key} and {twin} both name --{twin.replace("_", "-")}: ' if twin in cfg else f'key {key}: '
            fail(f'-c/--config {path}: {both}train.py reads config keys with underscores ({twin}); a key with '
                 'dashes would be ignored')
    actions = {a.dest: a for a in dst_parser._actions if a.dest != 'help'}
    defaults = {}
    for key, value in cfg.items():
        if key in actions:
            try:
                defaults[key] = _coerce(actions[key], value)
            except ValueError as e:
                fail(f'-c/--config {path}: key {key}: {value!r} is not accepted; expected {e}')
    dst_parser.set_defaults(**defaults)
    return path, set(cfg)


def _is_flag(tok: str) -> bool:
    if not tok.startswith('-') or tok == '-':
        return False
    try:
        float(tok)
        return False
    except ValueError:
        return True
