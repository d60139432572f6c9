"""`sam-hf train RECIPE [--section.key value ...]`: the papers' runs as YAML recipes.

RECIPE is a path to a YAML file or the name of a shipped recipe (`sam-hf train --list`):
the repository's top-level recipes/ folder, which a built wheel carries as sam_hf/recipes/*.yaml. Every field can be overridden with a dotted key:

    sam-hf train sampa_vit_cifar10_sampa --training.num_train_epochs 1 \\
        --data.image_folder ./my_images --model.name_or_path ./tiny_vit

Naming a data source (dataset / image_folder / train_file) or a model source
(name_or_path / config) replaces the recipe's; a new method.optim starts from
empty optim_args. `--print` shows the resolved recipe without training.
"""

from __future__ import annotations

import sys

from .schema import Recipe, RecipeError, load_recipe, load_yaml, parse_overrides, resolve, shipped_recipes

__all__ = ["Recipe", "RecipeError", "load_recipe", "main", "parse_overrides", "run", "shipped_recipes"]

USAGE = """usage: sam-hf train RECIPE [--section.key value ...] [--print]
       sam-hf train --list

RECIPE: a YAML file or a shipped recipe name. Sections: model, data, training
(any TrainingArguments field), method (optim, optim_args).
  --print   show the resolved recipe and exit
  --list    list the shipped recipes"""


def run(recipe: Recipe) -> dict:
    from .runner import run as _run  # transformers and datasets load only when training

    return _run(recipe)


def _list() -> str:
    lines = []
    for name, path in shipped_recipes().items():
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
        summary = str(raw.get("description", "")).strip().splitlines()
        lines.append(f"  {name:<28} {summary[0] if summary else ''}")
    return "shipped recipes:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a recipe is needed: a usage error, as `sam-hf launch` with nothing to run
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--list":
        print(_list())
        return 0
    if argv[0].startswith("--"):
        print(f"sam-hf train: error: the recipe comes first, got {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    show = "--print" in argv
    recipe_name, overrides = argv[0], [a for a in argv[1:] if a != "--print"]
    try:
        recipe = load_recipe(recipe_name, overrides)
        if show:  # with the recipe files' comments: the papers' citations
            from .render import render

            try:
                as_written = load_recipe(recipe_name) if overrides else None
            except RecipeError:  # the overrides made it valid
                as_written = None
            print(render(recipe, resolve(recipe_name), as_written), end="")
            return 0
        metrics = run(recipe)
    except RecipeError as err:
        print(f"sam-hf train: error: {err}", file=sys.stderr)
        return 2
    scores = {k: v for split in ("eval", "test") for k, v in metrics.get(split, {}).items()
              if not k.endswith(("runtime", "per_second", "epoch"))}
    print(f"done: {recipe.name}; " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
