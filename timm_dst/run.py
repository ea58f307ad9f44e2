"""``python -m timm_dst.run TRAIN_PY [train.py flags] --dst ...``: DST for timm's own ``train.py``, unmodified.

The launcher lives in :mod:`timm_dst.integrations.timm.launcher`; this module is that module under its command name.
"""
import sys

from .integrations.timm import launcher as _launcher

if __name__ == '__main__':
    _launcher.main()
else:
    sys.modules[__name__] = _launcher
