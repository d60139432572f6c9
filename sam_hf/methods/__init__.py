"""The methods, one module each: importing this package registers them (registry.py).

Each module holds a method's config (its options), its class (its step, its state, what it needs of the
layout) and one `register_method` call. The ascent rules (how a perturbation is formed) are in rules.py.
"""

# each module registers its method; in this order they are listed (--optim choices, docs, bench)
from . import sam  # noqa: I001
from . import msam
from . import sampa
from . import async_sam
from . import looksam, aesam, esam, gsam, saf, mesa  # noqa: F401  (the SAMPa paper's Table 4 variants, GSAM)
from .aesam import AESAM, AESAMConfig
from .async_sam import AsyncSAM, AsyncSAMConfig
from .base import GradientPasses, Progress, SharpnessMethod, StepResult, TwoRoleMethod
from .esam import ESAM, ESAMConfig
from .gsam import GSAM, GSAMConfig
from .looksam import LookSAM, LookSAMConfig
from .mesa import MESA, MESAConfig
from .msam import MSAM, MSAMConfig
from .rules import AscentOptions, AscentRule
from .saf import SAF, SAFConfig
from .sam import SAM, SAMConfig
from .sampa import SAMPa, SAMPaConfig

__all__ = ["AESAM", "AESAMConfig", "AscentOptions", "AscentRule", "AsyncSAM", "AsyncSAMConfig", "ESAM", "ESAMConfig",
           "GSAM", "GSAMConfig", "GradientPasses", "LookSAM", "LookSAMConfig", "MESA", "MESAConfig", "MSAM", "MSAMConfig",
           "Progress", "SAF", "SAFConfig", "SAM", "SAMConfig", "SAMPa", "SAMPaConfig", "SharpnessMethod", "StepResult",
           "TwoRoleMethod"]
