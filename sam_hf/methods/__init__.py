"""The methods, one module each: importing this package registers them (registry.py).

Each module holds a method's config (its options), its class (its step, its state, what it needs of the
layout) and one `register_method` call. The ascent rules (how a perturbation is formed) are in rules.py.
"""

# each module registers its method; in this order they are listed (--optim choices, docs, bench)
from . import sam  # noqa: I001
from . import msam
from . import sampa
from . import async_sam  # noqa: F401
from .async_sam import AsyncSAM, AsyncSAMConfig
from .base import GradientPasses, SharpnessMethod, StepResult, TwoRoleMethod
from .msam import MSAM, MSAMConfig
from .rules import AscentOptions, AscentRule
from .sam import SAM, SAMConfig
from .sampa import SAMPa, SAMPaConfig

__all__ = ["AscentOptions", "AscentRule", "AsyncSAM", "AsyncSAMConfig", "GradientPasses", "MSAM", "MSAMConfig", "SAM",
           "SAMConfig", "SAMPa", "SAMPaConfig", "SharpnessMethod", "StepResult", "TwoRoleMethod"]
