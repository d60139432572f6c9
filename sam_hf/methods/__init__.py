"""One file per method; each turns a step's batches into the gradient left in `.grad`."""

from .async_sam import AsyncSAM
from .base import GradientPasses, SharpnessMethod, StepResult
from .msam import MSAM
from .sam import SAM
from .sampa import SAMPa

METHOD_CLASSES = {cls.name: cls for cls in (SAM, MSAM, SAMPa, AsyncSAM)}

__all__ = ["AsyncSAM", "GradientPasses", "MSAM", "METHOD_CLASSES", "SAM", "SAMPa", "SharpnessMethod", "StepResult"]
