"""``python -m timm_dst.train`` / ``timm-dst-train``: a timm-style training program with DST built in.

The program lives in :mod:`timm_dst.cli.train`; this module is that module under its command name.
"""
import sys

from .cli import train as _train

if __name__ == '__main__':
    _train.main()
else:
    sys.modules[__name__] = _train
