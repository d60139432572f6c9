"""Every shipped recipe loads, validates and trains two steps on tiny local data; bad keys fail clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import typing
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sam_hf  # noqa: E402
from sam_hf.recipes import USAGE, RecipeError, load_recipe, main, parse_overrides, shipped_recipes  # noqa: E402
from sam_hf.recipes.schema import load_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORDS = "the a good bad movie film is was great awful fun boring plot actors".split()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny ViT and BERT checkpoint (with processor/tokenizer), an image folder and jsonl text data."""
    from PIL import Image
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizer, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)

    root = tmp_path_factory.mktemp("assets")
    rng = random.Random(0)
    for split, n in (("train", 8), ("test", 3)):
        for label, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixel = tuple(min(255, c + rng.randint(0, 50)) for c in colour)
                Image.new("RGB", (20, 20), pixel).save(folder / f"{i}.png")

    vit = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    ViTForImageClassification(vit).save_pretrained(root / "tiny_vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "tiny_vit")

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "tiny_bert")
    bert = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(bert).save_pretrained(root / "tiny_bert")
    for split, n in (("train", 16), ("dev", 6)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"sentence": " ".join(rng.choices(WORDS, k=6)), "label": i % 2, "idx": i}) + "\n")
    return root


def tiny_overrides(name: str, assets: Path, out: Path) -> list[str]:
    recipe = load_recipe(name)
    if recipe.data.dataset == "glue":
        local = ["--model.name_or_path", str(assets / "tiny_bert"),
                 "--data.train_file", str(assets / "train.jsonl"), "--data.validation_file", str(assets / "dev.jsonl")]
    else:
        local = ["--model.name_or_path", str(assets / "tiny_vit"), "--data.image_folder", str(assets / "images")]
    if "micro_batches" in recipe.method.optim_args:  # m must not exceed the tiny batch
        local += ["--method.optim_args.micro_batches", "2"]
    return local + [
        "--training.output_dir", str(out), "--training.max_steps", "2", "--training.logging_steps", "1",
        "--training.per_device_train_batch_size", "4", "--training.per_device_eval_batch_size", "4",
        "--training.eval_strategy", "no", "--training.save_strategy", "no",
        "--training.load_best_model_at_end", "false", "--training.dataloader_num_workers", "0",
        "--training.dataloader_pin_memory", "false",
    ]


def test_recipes_ship_for_every_paper_setting():
    names = set(shipped_recipes())
    assert {"sampa_vit_cifar10_sam", "sampa_vit_cifar10_sampa", "sampa_vit_cifar100_sam",
            "sampa_vit_cifar100_sampa", "msam_vit_cifar10", "msam_vit_cifar100",
            "asyncsam_vit_cifar100", "sampa_bert_glue"} <= names


def test_recipes_come_from_the_top_level_folder():
    """One copy: a source checkout (and the editable install `make test` uses) reads recipes/ in place;
    the package folder holds no YAML of its own (a built wheel gets copies, see test_wheel_ships_recipes)."""
    assert {p.resolve() for p in shipped_recipes().values()} == {p.resolve() for p in (REPO / "recipes").glob("*.yaml")}
    assert not list((REPO / "sam_hf" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (building in the shared checkout would write build/ and
    *.egg-info there). Offline: no build isolation, no index."""
    import shutil
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("sam_hf", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps",
                    "--no-build-isolation", "--no-index", str(src), "-w", str(tmp / "dist")],
                   check=True, capture_output=True, timeout=120)
    [built] = (tmp / "dist").glob("sam_hf-*.whl")
    return built


def test_wheel_ships_recipes(wheel):
    """The wheel carries recipes/*.yaml, byte for byte, as sam_hf/recipes/*.yaml."""
    import zipfile

    repo_recipes = {p.name: p.read_bytes() for p in (REPO / "recipes").glob("*.yaml")}
    with zipfile.ZipFile(wheel) as zf:
        packed = {Path(n).name: zf.read(n) for n in zf.namelist()
                  if n.startswith("sam_hf/recipes/") and n.endswith(".yaml")}
    assert packed == repo_recipes and len(packed) >= 8


def test_installed_wheel_finds_recipes(wheel, tmp_path):
    """sam_hf installed from the wheel (not the checkout, not the editable install) lists and loads every recipe."""
    import subprocess
    import sys

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps",
                    "--no-index", "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=120)
    check = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import sam_hf.recipes as r\n"
        "assert r.__file__.startswith(sys.argv[1]), r.__file__\n"
        "names = sorted(r.shipped_recipes())\n"
        "for n in names: r.load_recipe(n)\n"
        "print(' '.join(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check, str(site)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_recipe_loads_with_paper_settings(name):
    recipe = load_recipe(name)
    assert recipe.method.optim in ("sam", "msam", "sampa", "asyncsam")
    assert recipe.training["max_grad_norm"] == 1.0
    assert isinstance(recipe.training["learning_rate"], float)


def test_sampa_vit_recipes_follow_sections_5_1_and_5_3():
    """SAMPa Table 5: Sec. 5.3 (AdamW, clipping 1, 10 epochs, lr 1e-4) and Sec. 5.1 for the rest."""
    recipes = {name: load_recipe(f"sampa_vit_{name}") for name in
               ("cifar10_sam", "cifar10_sampa", "cifar100_sam", "cifar100_sampa")}
    rho = {name: r.method.optim_args["rho"] for name, r in recipes.items()}
    assert rho == {"cifar10_sam": 0.05, "cifar10_sampa": 0.1, "cifar100_sam": 0.1, "cifar100_sampa": 0.2}
    for name, r in recipes.items():
        assert r.data.dataset == name.split("_")[0]
        assert r.method.optim == name.split("_")[1]
        assert r.method.optim_args["base"] == "adamw_torch"
        assert r.method.optim_args.get("lam", 0.2) == 0.2
        t = r.training
        assert (t["num_train_epochs"], t["learning_rate"], t["max_grad_norm"]) == (10, 1e-4, 1.0)
        assert (t["per_device_train_batch_size"], t["lr_scheduler_type"], t["weight_decay"]) == (128, "cosine", 5e-4)
        assert t["label_smoothing_factor"] == 0.1 and "warmup_steps" not in t
        assert t["load_best_model_at_end"] is True and t["metric_for_best_model"] == "accuracy"
        d = r.data
        assert (d.validation_fraction, d.crop_padding, d.hflip, d.inception_crop) == (0.1, 4, True, False)
        assert len(d.image_mean) == len(d.image_std) == 3
    assert recipes["cifar10_sam"].data.image_mean != recipes["cifar100_sam"].data.image_mean


def test_msam_vit_recipes_follow_table_c1():
    for name in ("msam_vit_cifar10", "msam_vit_cifar100"):
        r = load_recipe(name)
        assert r.method.optim_args == {"rho": 0.3, "micro_batches": 32, "base": "adamw_torch"}
        t = r.training
        assert (t["num_train_epochs"], t["learning_rate"], t["per_device_train_batch_size"]) == (20, 1e-3, 512)
        assert (t["weight_decay"], t["max_grad_norm"], t["label_smoothing_factor"]) == (0.3, 1.0, 0.0)
        assert (t["lr_scheduler_type"], t["warmup_steps"]) == ("cosine", 0.05)
        assert r.data.inception_crop and r.data.hflip and r.data.crop_padding == 0


def test_asyncsam_recipe_follows_tables_a1_a2():
    r = load_recipe("asyncsam_vit_cifar100")
    assert r.data.dataset == "cifar100"
    t = r.training
    assert (t["per_device_train_batch_size"], t["learning_rate"], t["num_train_epochs"]) == (40, 0.01, 20)
    assert r.method.optim == "asyncsam"
    assert r.method.optim_args == {"rho": 0.05, "base": "sgd", "momentum": 0.9}


def test_sampa_glue_recipe_follows_section_5_3():
    r = load_recipe("sampa_bert_glue")
    t = r.training
    assert (t["learning_rate"], t["per_device_train_batch_size"], t["num_train_epochs"]) == (2e-5, 32, 3)
    assert (t["lr_scheduler_type"], t["max_grad_norm"]) == ("linear", 1.0)
    assert r.data.dataset_config == "sst2"
    assert r.method.optim_args == {"rho": 0.05, "lam": 0.1, "base": "adamw_torch"}


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_recipe_starts_on_tiny_data(name, assets, tmp_path):
    out = tmp_path / "run"
    assert main([name, *tiny_overrides(name, assets, out)]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    eval_metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= eval_metrics["eval_accuracy"] <= 1.0


def test_model_from_config_block(assets, tmp_path):
    """A fresh ViT from dotted --model.config.* overrides replaces the recipe's checkpoint."""
    args = [
        "--model.config.model_type", "vit", "--model.config.image_size", "16", "--model.config.patch_size", "8",
        "--model.config.hidden_size", "16", "--model.config.num_hidden_layers", "1",
        "--model.config.num_attention_heads", "2", "--model.config.intermediate_size", "32",
        "--data.image_folder", str(assets / "images"), "--data.hflip", "true",
        "--training.output_dir", str(tmp_path), "--training.max_steps", "2",
        "--training.per_device_train_batch_size", "4", "--training.dataloader_num_workers", "0",
        "--training.eval_strategy", "no", "--training.dataloader_pin_memory", "false",
    ]
    with pytest.raises(RecipeError, match="add --training.load_best_model_at_end false"):
        from sam_hf.recipes.runner import training_arguments

        training_arguments(load_recipe("sampa_vit_cifar10_sampa", args))
    args += ["--training.load_best_model_at_end", "false", "--training.save_strategy", "no"]
    recipe = load_recipe("sampa_vit_cifar10_sampa", args)
    assert recipe.model.name_or_path is None and recipe.model.config["hidden_size"] == 16
    assert recipe.data.dataset is None
    assert main(["sampa_vit_cifar10_sampa", *args]) == 0


def test_sentence_pair_regression_from_csv(assets, tmp_path):
    """An STS-B-like csv: two text columns found by their GLUE names, float labels train a regression head."""
    rng = random.Random(1)
    for split, n in (("train", 12), ("dev", 4)):
        rows = [f"{' '.join(rng.choices(WORDS, k=4))},{' '.join(rng.choices(WORDS, k=5))},{rng.uniform(0, 5):.2f}"
                for _ in range(n)]
        (tmp_path / f"{split}.csv").write_text("sentence1,sentence2,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["sampa_bert_glue", "--model.name_or_path", str(assets / "tiny_bert"),
                 "--data.train_file", str(tmp_path / "train.csv"), "--data.validation_file", str(tmp_path / "dev.csv"),
                 "--training.output_dir", str(out), "--training.max_steps", "2",
                 "--training.per_device_train_batch_size", "4", "--training.eval_strategy", "no",
                 "--training.dataloader_pin_memory", "false"]) == 0
    eval_metrics = json.loads((out / "eval_results.json").read_text())
    assert {"eval_pearson", "eval_spearmanr"} <= eval_metrics.keys()
    assert json.loads((out / "config.json").read_text())["problem_type"] == "regression"


def test_overrides_replace_sources_and_method():
    recipe = load_recipe("sampa_bert_glue", ["--data.train_file", "x.jsonl", "--method.optim", "adamw_torch",
                                             "--training.learning_rate", "3e-5", "--training.num_train_epochs=1"])
    assert recipe.data.dataset is None and recipe.data.dataset_config is None
    assert recipe.method.optim_args == {}
    assert recipe.training["learning_rate"] == 3e-5 and recipe.training["num_train_epochs"] == 1
    sam = load_recipe("sampa_bert_glue", ["--method.optim", "sam", "--method.optim_args", "rho=0.01,adaptive=true"])
    assert sam.optim_args_string() == "rho=0.01,adaptive=true"


@pytest.mark.parametrize("argv, message", [
    (["--trainig.num_train_epochs", "1"], "unknown section 'trainig' (did you mean 'training'?)"),
    (["--training.learnig_rate", "1"],
     "'learnig_rate' is not a TrainingArguments field (did you mean 'learning_rate'?)"),
    (["--training.num_train_epochs", "many"], "training.num_train_epochs: expected a number, got 'many'"),
    (["--training.optim", "sgd"], "set the optimizer in the method section (method.optim)"),
    (["--data.image_folde", "x"], "data has no key 'image_folde' (did you mean 'image_folder'?)"),
    (["--model.name", "x"], "model has no key 'name'"),
    (["--method.optim_args.rhoo", "0.1"], "method.optim_args: unknown key rhoo="),
    (["--method.optim_args.lam", "2"], "method.optim_args: lam=2.0 is not allowed"),
    (["--model.config.hidden_size", "8"], "model.config: needs model_type"),
    (["training.seed", "1"], "expected --section.key value, got 'training.seed'"),
])
def test_bad_overrides_name_the_key(argv, message, capsys):
    with pytest.raises(RecipeError) as err:
        load_recipe("sampa_vit_cifar10_sampa", argv)
    assert message in str(err.value)
    assert main(["sampa_vit_cifar10_sampa", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {dataset: cifar10}\ntraning: {}\n")
    with pytest.raises(RecipeError, match="unknown top-level key 'traning' .*did you mean 'training'"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no recipe file or shipped recipe named 'sampa_vit_cifar10_sma'"):
        load_recipe("sampa_vit_cifar10_sma")


def test_override_parser_reads_yaml_scalars():
    assert parse_overrides(["--training.bf16", "--data.text_columns", "[a, b]", "--training.seed", "3"]) == {
        "training": {"bf16": True, "seed": 3}, "data": {"text_columns": ["a", "b"]}}


def test_print_shows_resolved_recipe(capsys):
    assert main(["sampa_vit_cifar100_sampa", "--print", "--training.num_train_epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "dataset: cifar100" in out and "num_train_epochs: 1" in out and "lam: 0.2" in out


def test_validation_split_selects_the_model_and_reports_test(assets, tmp_path):
    """data.validation_fraction (SAMPa Sec. 5.1's protocol): evaluation during training on held-out training
    images, the best checkpoint loaded at the end, the eval split reported as test_*."""
    out = tmp_path / "run"
    args = ["--model.name_or_path", str(assets / "tiny_vit"), "--data.image_folder", str(assets / "images"),
            "--training.output_dir", str(out), "--training.max_steps", "2", "--training.eval_strategy", "steps",
            "--training.eval_steps", "1", "--training.save_strategy", "steps", "--training.save_steps", "1",
            "--training.per_device_train_batch_size", "4", "--training.per_device_eval_batch_size", "4",
            "--training.dataloader_num_workers", "0", "--training.dataloader_pin_memory", "false",
            "--data.validation_fraction", "0.25"]
    assert main(["sampa_vit_cifar10_sampa", *args]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None
    assert 0.0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1.0
    test = json.loads((out / "test_results.json").read_text())
    assert 0.0 <= test["test_accuracy"] <= 1.0


def test_image_augmentations():
    import random as rnd

    from PIL import Image

    from sam_hf.recipes.data import inception_crop, padded_crop

    rnd.seed(0)
    image = Image.new("RGB", (32, 24), (255, 255, 255))
    for _ in range(20):
        crop = padded_crop(image, 4)
        assert crop.size == (32, 24)
        inception = inception_crop(image)
        w, h = inception.size
        assert 0 < w <= 32 and 0 < h <= 24
    # Padding is black: some crop shows it, and a crop never moves further than the padding.
    assert any(padded_crop(image, 4).getpixel((0, 0)) == (0, 0, 0) for _ in range(50))
    assert padded_crop(image, 4).getpixel((16, 12)) == (255, 255, 255)
    tall = Image.new("RGB", (4, 40))  # no draw fits the ratio bounds: the centre crop within them
    assert inception_crop(tall, attempts=0).size == (4, 5)


@pytest.mark.parametrize("argv, message", [
    (["--data.image_mean", "[0.5, 0.5, 0.5]"], "data.image_mean and data.image_std: give both"),
    (["--data.image_mean", "[0.5]", "--data.image_std", "[0.5, 0.5]"], "one value per channel"),
    (["--data.image_std", "[0, 1, 1]", "--data.image_mean", "[0, 0, 0]"], "data.image_std: must be > 0"),
    (["--data.crop_padding", "-1"], "data.crop_padding: must be >= 0"),
    (["--data.validation_fraction", "1.5"], "data.validation_fraction: must be in (0, 1)"),
])
def test_bad_data_options(argv, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("msam_vit_cifar10", argv)  # a recipe with no normalisation of its own


def test_print_keeps_the_papers_citations(capsys):
    """--print renders the resolved recipe with the recipe files' comments: headers (of the recipe and the ones it
    extends) and each key's citation; an overridden key says what the recipe had. The text is still the recipe."""
    assert main(["sampa_vit_cifar100_sampa", "--print", "--training.num_train_epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "# SAMPa paper, Table 5: ViT-B/16 on CIFAR-100 with SAMPa-0.2." in out  # this recipe's header
    assert "# SAMPa paper (Xie, Pethick and Cevher, NeurIPS 2024)" in out  # the header of the recipe it extends
    assert "  learning_rate: 0.0001  # Sec. 5.3: peak learning rate" in out
    assert "  optim_args:  # Sec. 5.1: 2 x SAM's 0.1, lambda 0.2" in out  # the nearer file's comment
    assert "  num_train_epochs: 1  # overridden; the recipe has 10 (Sec. 5.3)" in out
    assert "  # Sec. 5.1 normalises with the training set's statistics" in out  # a comment above its key
    assert load_yaml(out) == load_recipe("sampa_vit_cifar100_sampa", ["--training.num_train_epochs", "1"]).to_dict()


def test_train_without_a_recipe_is_a_usage_error(capsys):
    assert main([]) == 2  # as `sam-hf launch` with nothing to run
    assert "usage: sam-hf train RECIPE" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_cli_version_and_usage_strings_agree(capsys):
    from sam_hf import cli

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"sam-hf {sam_hf.__version__} (torch ")
    train_usage = USAGE.splitlines()[0].removeprefix("usage: ")
    assert train_usage.startswith("sam-hf train RECIPE [--section.key value ...]")
    assert "sam-hf train RECIPE [--section.key value ...]" in cli._usage()


# ---- any override list: a valid recipe, or a RecipeError that names a key (property-based)

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sam_hf.recipes.schema import SECTIONS, SPECS  # noqa: E402

_KEYS = {section: [f.name for f in dataclasses.fields(spec)] for section, spec in SPECS.items()}
_KEYS["training"] = ["num_train_epochs", "learning_rate", "seed", "bf16", "eval_strategy", "output_dir",
                     "per_device_train_batch_size", "max_steps", "optim", "lerning_rate"]
_PATHS = st.one_of(
    st.sampled_from(list(_KEYS)).flatmap(lambda s: st.sampled_from(_KEYS[s]).map(lambda k: f"{s}.{k}")),
    st.sampled_from(["model.config.hidden_size", "model.config.model_type", "method.optim_args.rho",
                     "method.optim_args.lam", "method.optim_args.nope", "data.dataset.x", "name", "description",
                     "name.x", "training", "nosection.key", "model", ""]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._-", max_size=12))
_VALUES = st.one_of(
    st.sampled_from(["1", "0", "-1", "0.5", "1e-4", "2.0e-5", "true", "false", "null", "~", "[]", "[a, b]", "[1, 2]",
                     "{}", "{a: 1}", "{model_type: bert}", "rho=0.1,lam=0.2", "rho=-1", "rho", "sam", "sampa", "sgd",
                     "cifar10", "x.csv", "x.txt", "epoch", "no", "'quoted'", "[unclosed", "a: b", "-", "--x", ""]),
    st.text(max_size=12))
_OVERRIDE = st.one_of(
    st.builds(lambda p, v: [f"--{p}", v], _PATHS, _VALUES),
    st.builds(lambda s, v: [f"--{s}", v], st.sampled_from(["data", "model", "method"]).flatmap(
        lambda s: st.sampled_from(_KEYS[s]).map(lambda k: f"{s}.{k}")), st.sampled_from(["5", "0.5", "[a]", "{a: 1}",
                                                                                          "true", "x.csv"])),
    st.builds(lambda p, v: [f"--{p}={v}"], _PATHS, _VALUES),
    st.builds(lambda p: [f"--{p}"], _PATHS),
    st.text(max_size=8).map(lambda t: [t]))


def _assert_well_typed(recipe) -> None:
    """Every field of the model, data and method sections holds a value of its annotated type."""
    for section, spec in SPECS.items():
        hints = typing.get_type_hints(spec)
        for f in dataclasses.fields(spec):
            value = getattr(getattr(recipe, section), f.name)
            kinds = tuple(typing.get_origin(t) or t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)))
            if float in kinds:
                kinds += (int,)
            assert value is None or isinstance(value, kinds), (section, f.name, value)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(overrides=st.lists(_OVERRIDE, max_size=4).map(lambda groups: [a for g in groups for a in g]),
       recipe=st.sampled_from(["sampa_bert_glue", "sampa_vit_cifar100_sampa"]))
@example(overrides=["--data.train_file", "5"], recipe="sampa_bert_glue")  # was a TypeError from pathlib
@example(overrides=["--data.dataset", "[a]"], recipe="sampa_bert_glue")  # was accepted, a list as the dataset
@example(overrides=["--data.text_columns", "{a: 1}"], recipe="sampa_bert_glue")  # was accepted as [{a: 1}]
@example(overrides=["--method.optim", "adamw_nope"], recipe="sampa_bert_glue")  # was accepted until training
def test_any_overrides_give_a_recipe_or_an_error_naming_a_key(overrides, recipe):
    try:
        result = load_recipe(recipe, overrides)
    except RecipeError as err:
        message = str(err)
        words = {w for arg in overrides for w in re.split(r"[-.=\s]+", arg) if w} | set(SECTIONS) | {
            "name", "description", "section"}
        assert any(w in message or repr(w)[1:-1] in message for w in words), (overrides, message)
        return
    _assert_well_typed(result)
    result.to_dict()
    result.optim_args_string()
