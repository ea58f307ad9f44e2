"""DST methods; importing this package registers every built-in method name."""
from ..core.method import DensePhase, SparseMethod
from .dsr import DSR
from .gmp import GMP
from .lth import LTH, LTHSetITOP, capture_weights, load_weights, lottery_ticket, save_weights
from .rigl import RigL
from .set import SET
from .snfs import SNFS
from .snip import SNIP, SNIPSetITOP
from .static import Dense, Static

__all__ = ['SparseMethod', 'DensePhase', 'Dense', 'Static', 'SET', 'RigL', 'SNFS', 'DSR']
__all__ += ['GMP', 'SNIP', 'SNIPSetITOP', 'LTH', 'LTHSetITOP', 'lottery_ticket']
__all__ += ['capture_weights', 'save_weights', 'load_weights']
