"""sam_hf: sharpness-aware training (SAM, ASAM, mSAM, SAMPa-lambda, Asynchronous SAM) for Hugging Face Trainer
and plain PyTorch loops.

`import sam_hf` registers the method names (`sam`, `msam`, `sampa`, `asyncsam`, ...) with transformers, so
`--optim sampa --optim_args "rho=0.05,lam=0.2"` works in any script that builds a Trainer;
`SharpnessOptimizer(base, "sam", rho=0.05).step(closure)` runs the same methods in a plain loop.
"""

from . import methods as _methods  # noqa: F401  (registers the methods)
from . import registry
from .config import SharpnessConfig, SharpnessConfigError
from .distributed.placement import place_ascent_rank
from .optim import BatchClosure, SharpnessOptimizer
from .sharpness import SharpnessCallback, measure_sharpness
from .trainer import SharpnessMixin, SharpnessTrainer
from .trainer import integration as _integration

__version__ = "0.1.0"


def register_method(name: str, method: type, config: type, summary: str, paper: str = "", examples=()):
    """Add a method (see registry.py and docs/architecture.md): it becomes an `--optim` name at once."""
    spec = registry.register_method(name, method, config, summary, paper, examples)
    _integration.register_optimizer_names()
    global METHODS
    METHODS = registry.names()
    return spec


METHODS = registry.names()  # the --optim names of the registered methods
_integration.install()

__all__ = ["BatchClosure", "METHODS", "SharpnessCallback", "SharpnessConfig", "SharpnessConfigError",
           "SharpnessMixin", "SharpnessOptimizer", "SharpnessTrainer", "__version__", "measure_sharpness",
           "place_ascent_rank", "register_method"]
