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

REPO = Path(__file__).resolve().parents[1]
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
        "--training.eval_strategy", "no", "--training.dataloader_num_workers", "0",
        "--training.dataloader_pin_memory", "false",
    ]


def test_recipes_ship_for_every_paper_setting():
    names = set(shipped_recipes())
    assert {"sampa_vit_cifar10_sam", "sampa_vit_cifar10_sampa", "sampa_vit_cifar100_sam",
            "sampa_vit_cifar100_sampa", "msam_vit_cifar10", "msam_vit_cifar100",
            "asyncsam_vit_cifar100", "sampa_bert_glue"} <= names


def test_packaged_recipes_match_repo_copies():
    """recipes/ (browsable at the top of the repo) and sam_hf/recipes/ (installed) hold the same files."""
    top = {p.name: p.read_text() for p in (REPO / "recipes").glob("*.yaml")}
    packaged = {p.name: p.read_text() for p in shipped_recipes().values()}
    assert top == packaged, "recipes/ and sam_hf/recipes/ differ: cp recipes/*.yaml sam_hf/recipes/"


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_recipe_loads_with_paper_settings(name):
    recipe = load_recipe(name)
    assert recipe.method.optim in ("sam", "msam", "sampa", "asyncsam")
    assert recipe.training["max_grad_norm"] == 1.0
    assert isinstance(recipe.training["learning_rate"], float)


def test_paper_values():
    sam, sampa = load_recipe("sampa_vit_cifar100_sam"), load_recipe("sampa_vit_cifar100_sampa")
    assert sam.data.dataset == sampa.data.dataset == "cifar100"
    assert sampa.method.optim_args["rho"] == 2 * sam.method.optim_args["rho"]
    assert sampa.method.optim_args["lam"] == 0.2 and sampa.training["learning_rate"] == 1e-4
    msam = load_recipe("msam_vit_cifar10")
    assert msam.method.optim_args == {"rho": 0.3, "micro_batches": 32, "base": "adamw_torch"}
    assert msam.training["per_device_train_batch_size"] == 512 and msam.training["weight_decay"] == 0.3
    glue = load_recipe("sampa_bert_glue")
    assert glue.training["learning_rate"] == 2e-5 and glue.training["per_device_train_batch_size"] == 32


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
