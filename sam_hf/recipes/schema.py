"""Recipe schema: load a YAML recipe, apply `extends` and command-line overrides, validate.

A recipe has four sections. `model`, `data` and `method` have fixed keys (the
dataclasses below); `training` takes any `transformers.TrainingArguments` field.
Every error names the offending key as the user wrote it, with a suggestion
when the key looks like a typo.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import registry
from ..config import SharpnessConfig, SharpnessConfigError

# One copy of the recipes: the top-level recipes/ folder of the repository. A built wheel carries them
# as sam_hf/recipes/*.yaml (setup.py's build_py copies them there); a source checkout or an editable
# install (`pip install -e .`) reads recipes/ in place.
PACKAGED_RECIPES = Path(__file__).resolve().parent
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def recipe_dir() -> Path:
    """Where the shipped recipes are: the checkout's recipes/ when sam_hf runs from source, else the
    copies inside the installed package."""
    if (SOURCE_ROOT / "setup.py").is_file() and (SOURCE_ROOT / "recipes").is_dir():
        return SOURCE_ROOT / "recipes"
    return PACKAGED_RECIPES


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`eval_strategy: no` stays "no")
    and `1e-4` is a float (YAML 1.1 reads both as something else)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message says which key and why."""


@dataclass
class ModelSpec:
    name_or_path: str | None = None  # Hub id or local directory of a checkpoint
    config: dict | None = None  # or build a fresh model: {model_type: vit, hidden_size: 64, ...}
    processor: str | None = None  # image processor / tokenizer location, when not name_or_path


@dataclass
class DataSpec:
    dataset: str | None = None  # Hub dataset: cifar10, cifar100, glue, ...
    dataset_config: str | None = None  # its configuration, e.g. the GLUE task (sst2)
    image_folder: str | None = None  # local folder in `imagefolder` layout (split/class/img.png)
    train_file: str | None = None  # local csv or json lines
    validation_file: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # default: validation, else test, else held out from train
    eval_fraction: float = 0.1  # held-out share of train when there is no eval split
    # Hold out this share of train as a validation split: evaluation during training (and
    # load_best_model_at_end) uses it, and the eval split is reported at the end as test_*.
    validation_fraction: float | None = None
    image_column: str | None = None  # default: the first Image column
    label_column: str | None = None  # default: label, labels or fine_label
    text_columns: list | None = None  # default: GLUE's column names found in the data
    max_length: int = 128  # tokenizer truncation
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    hflip: bool = False  # random horizontal flip of training images
    crop_padding: int = 0  # random crop of the image's own size after padding each side with N black pixels
    inception_crop: bool = False  # random-resized crop: 8%-100% of the area, aspect ratio 3/4-4/3
    image_mean: list | None = None  # per-channel normalisation instead of the image processor's
    image_std: list | None = None


@dataclass
class MethodSpec:
    optim: str = "adamw_torch"  # sam, msam, sampa, asyncsam or any transformers optimizer
    optim_args: dict = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    description: str
    model: ModelSpec
    data: DataSpec
    training: dict
    method: MethodSpec

    def optim_args_string(self) -> str | None:
        """optim_args in the "k=v,k=v" form TrainingArguments takes."""
        args = self.method.optim_args
        if not args:
            return None
        fmt = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
        return ",".join(f"{k}={fmt(v)}" for k, v in args.items())

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description,
            "model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
            "training": dict(self.training), "method": dataclasses.asdict(self.method),
        }


SPECS = {"model": ModelSpec, "data": DataSpec, "method": MethodSpec}
SECTIONS = ("model", "data", "training", "method")
TOP_LEVEL = ("name", "description", "extends") + SECTIONS

# Choosing one source replaces the recipe's other sources: `--data.image_folder x`
# on a CIFAR recipe drops `dataset`, `--model.config.* ...` drops `name_or_path`.
EXCLUSIVE = {
    "model": [("name_or_path",), ("config",)],
    "data": [("dataset", "dataset_config"), ("image_folder",), ("train_file", "validation_file")],
}
# A method's arguments belong to it: a new `optim` starts from empty optim_args.
DEPENDENT = {"method": {"optim": ("optim_args",)}}


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _training_fields() -> dict:
    from transformers import TrainingArguments

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}


# ---------------------------------------------------------------- loading


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipe_dir().glob("*.yaml"))}


def resolve(recipe: str, relative_to: Path | None = None) -> Path:
    """A path to a YAML file, or the name of a recipe shipped with sam_hf."""
    candidates = [Path(recipe)]
    if relative_to is not None:
        candidates.insert(0, relative_to / recipe)
    for path in candidates:
        for p in (path, path.with_name(path.name + ".yaml")):
            if p.is_file():
                return p
    shipped = shipped_recipes()
    name = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    if name in shipped:
        return shipped[name]
    raise RecipeError(f"no recipe file or shipped recipe named {recipe!r}{_suggest(name, shipped)}; "
                      f"shipped: {', '.join(shipped)}")


def _read(path: Path, seen: tuple = ()) -> dict:
    """Raw dict of one recipe with its `extends` chain merged underneath."""
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `extends` loops back to itself")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise RecipeError(f"{path}: unknown top-level key {key!r}{_suggest(key, TOP_LEVEL)}; "
                              f"allowed: {', '.join(TOP_LEVEL)}")
    parent = raw.pop("extends", None)
    raw.setdefault("name", path.stem)
    if parent is None:
        return raw
    base = _read(resolve(parent, relative_to=path.parent), seen + (path.resolve(),))
    base.pop("name", None)
    base.pop("description", None)
    return merge(base, raw)


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base`, applying the EXCLUSIVE and DEPENDENT rules."""
    out = copy.deepcopy(base)
    for section, value in update.items():
        if not (isinstance(value, dict) and isinstance(out.get(section), dict)):
            out[section] = copy.deepcopy(value)
            continue
        target = out[section]
        groups = EXCLUSIVE.get(section, [])
        touched = [g for g in groups if any(k in value for k in g)]
        for group in groups:
            if touched and group not in touched:
                for k in group:
                    target.pop(k, None)
        for key, dropped in DEPENDENT.get(section, {}).items():
            if key in value:
                for k in dropped:
                    target.pop(k, None)
        _deep_update(target, value)
    return out


def _deep_update(target: dict, value: dict) -> None:
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


# ---------------------------------------------------------------- overrides


def parse_overrides(argv: list[str]) -> dict:
    """`--section.key value` (or `--section.key=value`) pairs into a nested dict.

    Values are read as YAML scalars (1, 0.1, true, null, [a, b]); a flag with no
    value means true. Paths are checked here so the error names the flag.
    """
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError(f"expected --section.key value, got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                text, i = argv[i + 1], i + 1
            else:
                text = "true"
        i += 1
        path = key.split(".")
        _check_path(path, flag=f"--{key}")
        value = _scalar(text)
        if path[-1] == "optim_args" and isinstance(value, str):
            value = _parse_optim_args(value, f"--{key}")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--{key}: conflicts with an earlier override of {part!r}")
        node[path[-1]] = value
    return out


def _scalar(text: str) -> Any:
    try:
        return load_yaml(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _parse_optim_args(text: str, where: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise RecipeError(f"{where}: expected key=value pairs like 'rho=0.05,lam=0.2', got {item!r}")
        out[k.strip()] = _scalar(v.strip())
    return out


def _check_path(path: list[str], flag: str) -> None:
    section = path[0]
    if section in ("name", "description"):
        if len(path) > 1:
            raise RecipeError(f"{flag}: {section!r} takes a value, not sub-keys")
        return
    if section not in SECTIONS:
        raise RecipeError(f"{flag}: unknown section {section!r}{_suggest(section, SECTIONS)}; "
                          f"sections: {', '.join(SECTIONS)}")
    if len(path) == 1:
        raise RecipeError(f"{flag}: name a key inside {section!r}, e.g. --{section}.KEY VALUE")
    key = path[1]
    if section == "training":
        _check_training_key(key, flag)
        return
    known = [f.name for f in dataclasses.fields(SPECS[section])]
    if key not in known:
        raise RecipeError(f"{flag}: {section} has no key {key!r}{_suggest(key, known)}; "
                          f"keys: {', '.join(known)}")
    if len(path) > 2 and key not in ("config", "optim_args"):
        raise RecipeError(f"{flag}: {section}.{key} takes a value, not sub-keys")


def _check_training_key(key: str, where: str) -> None:
    if key in ("optim", "optim_args"):
        raise RecipeError(f"{where}: set the optimizer in the method section (method.{key})")
    fields = _training_fields()
    if key not in fields:
        raise RecipeError(f"{where}: {key!r} is not a TrainingArguments field{_suggest(key, fields)}")


# ---------------------------------------------------------------- validation


def load_recipe(recipe: str | Path, overrides: list[str] | dict | None = None) -> Recipe:
    """Read RECIPE (path or shipped name), apply overrides, return a validated Recipe."""
    path = resolve(str(recipe))
    raw = _read(path)
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        raw = merge(raw, overrides)
    try:
        return validate(raw)
    except RecipeError as err:
        raise RecipeError(f"{path.name}: {err}") from None


def validate(raw: dict) -> Recipe:
    sections = {}
    for section in SECTIONS:
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise RecipeError(f"{section}: expected a mapping, got {value!r}")
        sections[section] = value
    for key in sections["training"]:
        _check_training_key(key, f"training.{key}")
    training = {k: _coerce(v, _training_fields()[k], f"training.{k}") for k, v in sections["training"].items()}
    if isinstance(sections["method"].get("optim_args"), str):  # the "rho=0.05,lam=0.2" form
        sections["method"] = {**sections["method"],
                              "optim_args": _parse_optim_args(sections["method"]["optim_args"], "method.optim_args")}
    model = _build(ModelSpec, sections["model"], "model")
    data = _build(DataSpec, sections["data"], "data")
    method = _build(MethodSpec, sections["method"], "method")
    _check_model(model)
    _check_data(data)
    recipe = Recipe(name=str(raw.get("name", "recipe")), description=str(raw.get("description", "")).strip(),
                    model=model, data=data, training=training, method=method)
    _check_method(recipe)
    return recipe


def _build(cls, values: dict, section: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise RecipeError(f"{section} has no key {key!r}{_suggest(key, known)}; keys: {', '.join(known)}")
        kwargs[key] = _coerce(_text(value, hints[key], f"{section}.{key}"), hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _text(value: Any, annotation: Any, where: str) -> Any:
    """A field of ours that holds a string (a name, a path, a choice): YAML reads `5` as a number, which is its
    text; a list, a mapping or a boolean is an error here, not deep inside training."""
    if value is None or isinstance(value, str) or not set(typing.get_args(annotation) or {annotation}) <= {
            str, type(None)}:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RecipeError(f"{where}: expected a string (a name or a path), got {value!r}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a value against a field's type, so a wrong type fails here rather than
    deep inside training; numbers given as strings ("1e-4", "3") become numbers."""
    if value is None:
        return None
    allowed = set(typing.get_args(annotation)) or {annotation}
    origins = {typing.get_origin(t) or t for t in allowed}
    if str in origins or typing.Any in origins or any(getattr(t, "__module__", "") == "typing" for t in origins):
        return value
    if bool in origins:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not ({int, float} & origins):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if {int, float} & origins and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)):
            if float in origins:
                return number
            if float(number).is_integer():
                return int(number)
        kind = "a number" if float in origins else "an integer"
        raise RecipeError(f"{where}: expected {kind}, got {value!r}")
    if dict in origins and not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping, got {value!r}")
    if list in origins and isinstance(value, dict):
        raise RecipeError(f"{where}: expected a list (or one value), got the mapping {value!r}")
    if list in origins and not isinstance(value, list):
        return [value]
    return value


def _check_model(model: ModelSpec) -> None:
    if (model.name_or_path is None) == (model.config is None):
        raise RecipeError("model: give exactly one of name_or_path (a checkpoint) or config (a fresh model)")
    if model.config is not None and "model_type" not in model.config:
        raise RecipeError("model.config: needs model_type (e.g. vit, bert) to build a model from config")


def _check_data(data: DataSpec) -> None:
    sources = [k for k in ("dataset", "image_folder", "train_file") if getattr(data, k)]
    if len(sources) != 1:
        raise RecipeError("data: give exactly one source: dataset (Hub), image_folder or train_file "
                          f"(got {', '.join(sources) or 'none'})")
    if data.validation_file and not data.train_file:
        raise RecipeError("data.validation_file: needs data.train_file")
    if data.dataset_config and not data.dataset:
        raise RecipeError("data.dataset_config: needs data.dataset")
    for key in ("train_file", "validation_file"):
        value = getattr(data, key)
        if value and Path(value).suffix.lower() not in (".csv", ".json", ".jsonl"):
            raise RecipeError(f"data.{key}: expected a .csv, .json or .jsonl file, got {value!r}")
    if not 0 < data.eval_fraction < 1:
        raise RecipeError(f"data.eval_fraction: must be in (0, 1), got {data.eval_fraction}")
    if data.validation_fraction is not None and not 0 < data.validation_fraction < 1:
        raise RecipeError(f"data.validation_fraction: must be in (0, 1), got {data.validation_fraction}")
    if data.crop_padding < 0:
        raise RecipeError(f"data.crop_padding: must be >= 0, got {data.crop_padding}")
    for key in ("image_mean", "image_std"):
        value = getattr(data, key)
        if value is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise RecipeError(f"data.{key}: expected a list of numbers, one per channel, got {value!r}")
    if (data.image_mean is None) != (data.image_std is None) or (
            data.image_mean is not None and len(data.image_mean) != len(data.image_std)):
        raise RecipeError("data.image_mean and data.image_std: give both, with one value per channel")
    if data.image_std is not None and any(v <= 0 for v in data.image_std):
        raise RecipeError(f"data.image_std: must be > 0, got {data.image_std}")


def _check_method(recipe: Recipe) -> None:
    """Sharpness methods: SharpnessConfig checks optim_args now, not after the data has loaded."""
    from transformers.training_args import OptimizerNames

    methods = registry.names()
    names = sorted({*methods, *(o.value for o in OptimizerNames)})
    if recipe.method.optim not in names:
        raise RecipeError(f"method.optim: {recipe.method.optim!r} is not an optimizer Trainer knows"
                          f"{_suggest(recipe.method.optim, names)}; sam_hf's are {', '.join(methods)}")
    if registry.is_method(recipe.method.optim):
        try:
            SharpnessConfig.from_optim_args(recipe.method.optim, recipe.optim_args_string())
        except SharpnessConfigError as err:
            raise RecipeError(f"method.{err}") from None
