"""Every shipped recipe loads, validates and trains two steps on tiny local data; bad keys fail clearly."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sam_hf.recipes import RecipeError, load_recipe, main, parse_overrides, shipped_recipes  # noqa: E402

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
