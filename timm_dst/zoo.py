"""Deprecated path of :mod:`timm_dst.tools.zoo` (``python -m timm_dst.tools.zoo``), kept for one release."""
import sys

from ._compat import warn_moved
from .tools import zoo as _zoo

warn_moved('timm_dst.zoo', 'timm_dst.tools.zoo')
if __name__ == '__main__':
    sys.exit(_zoo.main())
else:
    sys.modules[__name__] = _zoo
