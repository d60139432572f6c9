from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
RECIPES = HERE / "recipes"  # the one copy of the YAML recipes; users browse it in the repository


class BuildPyWithRecipes(build_py):
    """Ship the top-level recipes/*.yaml inside the package as sam_hf/recipes/*.yaml.

    A built wheel (or a regular install) gets copies made here, at build time; an editable install
    (`pip install -e .`, used by `make test`) builds nothing and sam_hf reads recipes/ in place
    (sam_hf/recipes/schema.py: recipe_dir).
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        recipes = sorted(RECIPES.glob("*.yaml"))
        if not recipes:  # e.g. an sdist built without MANIFEST.in: fail rather than ship no recipes
            raise FileNotFoundError(f"no recipes in {RECIPES}: sam_hf ships them from there")
        target = Path(self.build_lib) / "sam_hf" / "recipes"
        self.mkpath(str(target))
        for recipe in recipes:
            self.copy_file(str(recipe), str(target / recipe.name))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = Path(self.build_lib) / "sam_hf" / "recipes"
        return outputs + [str(target / recipe.name) for recipe in sorted(RECIPES.glob("*.yaml"))]


setup(
    name="sam_hf",
    version="0.1.0",
    description="Sharpness-aware training (SAM, mSAM, SAMPa, Asynchronous SAM) as a one-flag change for Hugging Face Trainer",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sam_hf", "sam_hf.*"]),
    cmdclass={"build_py": BuildPyWithRecipes},  # recipes/*.yaml -> sam_hf/recipes/*.yaml in the wheel
    python_requires=">=3.10",
    install_requires=[
        # Tested with what `make test` installs: torch 2.13.0, transformers 5.24.0, accelerate 1.15.0,
        # datasets 5.2.0, evaluate 0.4.6, peft 0.21.2 (and trl 1.16.0 for the TRL extra, deepspeed 0.19.8 for
        # the DeepSpeed extra).
        "torch>=2.4,<3",
        "transformers>=5.0,<6",
        "accelerate>=1.10,<2",
        "datasets>=3.0,<6",
        "evaluate>=0.4.3,<0.5",
        "peft>=0.17,<1",
        "pyyaml>=6",
        "numpy",
        "scipy>=1.10",  # measure_sharpness: Lanczos through scipy.sparse.linalg.eigsh
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "matplotlib>=3.7", "scipy"],
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        "trl": ["trl>=0.20"],
        # the version tested (a source distribution: pip install --no-build-isolation deepspeed==0.19.8)
        "deepspeed": ["deepspeed==0.19.8"],
    },
    entry_points={"console_scripts": ["sam-hf=sam_hf.cli:main"]},
)
