"""The earlier name of :mod:`gpipe.state` (saved training state), kept so existing imports work.

``checkpoint`` alone is ambiguous (re-materialization is the other kind); new code imports
:mod:`gpipe.state`. The invariant: this module defines nothing — every name is
:mod:`gpipe.state`'s own object, so patching one patches the other's users only through
:mod:`gpipe.state`.
"""

from gpipe.state import *  # noqa: F403
from gpipe.state import __all__  # noqa: F401
