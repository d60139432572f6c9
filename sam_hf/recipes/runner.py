"""Run a validated Recipe: build the model, its processor and the data, then train and evaluate."""

from __future__ import annotations

from .data import Splits, load_splits, prepare
from .metrics import classification_metrics, regression_metrics
from .schema import ModelSpec, Recipe, RecipeError


def training_arguments(recipe: Recipe):
    from transformers import TrainingArguments

    values = {
        "output_dir": f"runs/{recipe.name}",
        # data.prepare keeps exactly the model's inputs; images need their raw column until the transform.
        "remove_unused_columns": False,
        **recipe.training,
        "optim": recipe.method.optim,
        "optim_args": recipe.optim_args_string(),
    }
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as err:
        hint = ""
        if values.get("load_best_model_at_end") and "load_best_model_at_end" in str(err):
            hint = ("\n(this recipe selects its best checkpoint: with another eval_strategy or save_strategy add "
                    "--training.load_best_model_at_end false, or set both strategies alike)")
        raise RecipeError(f"training: {err}{hint}") from None


def build_model(spec: ModelSpec, splits: Splits):
    """(model, processor): a checkpoint with a fresh head sized for the data, or a model from config."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if splits.kind == "image" else AutoModelForSequenceClassification
    if splits.label_names is None:
        labels = {"num_labels": 1, "problem_type": "regression"}
    else:
        names = splits.label_names
        labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
    if spec.name_or_path:
        try:
            # ignore_mismatched_sizes: a checkpoint's own head (e.g. ImageNet's 1000 classes) is replaced.
            model = auto.from_pretrained(spec.name_or_path, ignore_mismatched_sizes=True, **labels)
        except OSError as err:  # not on disk and the Hub unreachable, or no such model
            raise RecipeError(f"model.name_or_path {spec.name_or_path!r}: could not load it ({err}). Offline? "
                              "Give a local checkpoint directory or a model.config block") from err
    else:
        try:
            config = AutoConfig.for_model(**spec.config, **labels)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"model.config: {err}") from None
        model = auto.from_config(config)
    return model, load_processor(spec, model.config, splits.kind)


def load_processor(spec: ModelSpec, config, kind: str):
    from transformers import AutoImageProcessor, AutoTokenizer, ViTImageProcessor

    source = spec.processor or spec.name_or_path
    if kind == "image":
        if source:
            return AutoImageProcessor.from_pretrained(source)
        size, channels = config.image_size, getattr(config, "num_channels", 3)
        return ViTImageProcessor(size={"height": size, "width": size},
                                 image_mean=[0.5] * channels, image_std=[0.5] * channels)
    if not source:
        raise RecipeError("model.processor: a text model built from config needs a tokenizer (path or Hub id)")
    return AutoTokenizer.from_pretrained(source)


def run(recipe: Recipe) -> dict:
    """Train and evaluate; returns {"train": metrics, "eval": metrics} (and "test" with
    data.validation_fraction, after the best checkpoint is loaded when load_best_model_at_end is set).
    Results land in output_dir."""
    from transformers import set_seed

    from .. import SharpnessTrainer

    args = training_arguments(recipe)
    set_seed(args.seed)
    splits = load_splits(recipe.data, seed=args.seed)
    model, processor = build_model(recipe.model, splits)
    train, evaluation, collator = prepare(splits, recipe.data, processor, model.config)
    trainer = SharpnessTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        processing_class=processor,
        compute_metrics=regression_metrics if splits.label_names is None else classification_metrics,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = {"train": result.metrics, "eval": trainer.evaluate()}
    if splits.test is not None:  # data.validation_fraction: eval is the held-out validation split
        metrics["test"] = trainer.evaluate(splits.test, metric_key_prefix="test")
    for split, values in metrics.items():
        trainer.log_metrics(split, values)
        trainer.save_metrics(split, values)
    trainer.save_model()
    trainer.save_state()
    return metrics

