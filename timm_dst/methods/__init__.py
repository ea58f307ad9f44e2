"""DST methods; importing this package registers every built-in method name."""
from ._base import SparseMethod
from .dsr import DSR
from .rigl import RigL
from .set import SET
from .snfs import SNFS
from .static import Dense, Static

__all__ = ['SparseMethod', 'Dense', 'Static', 'SET', 'RigL', 'SNFS', 'DSR']
