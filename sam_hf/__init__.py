"""sam_hf: sharpness-aware training (SAM, mSAM, SAMPa-lambda, Asynchronous SAM) for Hugging Face Trainer.

`import sam_hf` registers the optimizer names `sam`, `msam`, `sampa` and
`asyncsam` with transformers, so `--optim sampa --optim_args "rho=0.05,lam=0.2"`
works in any script that builds a Trainer.
"""

from .config import METHODS, SharpnessConfig, SharpnessConfigError
from .integration import install as _install
from .methods import METHOD_CLASSES
from .optimizer import SharpnessOptimizer
from .placement import place_ascent_rank
from .sharpness import SharpnessCallback, measure_sharpness
from .trainer import SharpnessMixin, SharpnessTrainer

_install()

__version__ = "0.1.0"

__all__ = ["METHODS", "METHOD_CLASSES", "SharpnessCallback", "SharpnessConfig", "SharpnessConfigError",
           "SharpnessMixin", "SharpnessOptimizer", "SharpnessTrainer", "__version__", "measure_sharpness",
           "place_ascent_rank"]
