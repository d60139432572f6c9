#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task, with sharpness-aware training.

Written like Hugging Face's examples/pytorch/text-classification/run_glue.py:
every TrainingArguments flag works, and because `import sam_hf` registers the
sharpness-aware optimizer names, so do

    python glue_scripts/run_glue.py --model_name_or_path bert-base-uncased \
        --task_name rte --do_train --do_eval --output_dir out/rte \
        --optim sampa --optim_args "rho=0.005,lam=0.1"

Data comes from the Hub (`nyu-mll/glue`) or, offline, from --train_file /
--validation_file (csv or json lines with GLUE's column names and `label`).
Metrics follow GLUE; without the Hub they are computed by glue_metrics.py.
Results land in output_dir/eval_results.json (and train_results.json).

--sharpness_samples S measures the sharpness of the training loss at the end
of training: lambda_max, the largest eigenvalue of its Hessian, on a fixed
sample of S training examples (drawn with --sharpness_seed from the training
set, so every method and training seed of a grid sees the same examples), with
sam_hf.SharpnessCallback; --sharpness_every N also measures every N optimizer
steps. It goes to output_dir/sharpness_results.json and changes nothing in
training (same weights, bitwise). Cost: 8 to 12 Hessian-vector products
(each a forward and two backward passes over the sample) per measurement.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

try:
    import sam_hf  # registers the optim names sam, msam, sampa, asyncsam
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sam_hf

from glue_metrics import compute_glue_metrics

logger = logging.getLogger(__name__)

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# The Hub's label names, in id order: local files may hold ids or these names.
GLUE_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "wnli": ["not_entailment", "entailment"],
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of a pretrained model."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise heads whose size differs from the checkpoint's."}
    )
    save_model: bool = field(
        default=True, metadata={"help": "Save the fine-tuned model to output_dir (grids turn it off: results only)."}
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": f"GLUE task: {', '.join(TASK_TO_KEYS)}."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data, csv or json lines."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (MNLI: matched)."})
    validation_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI only: local mismatched validation data, reported with suffix _mm."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Local data to predict (--do_predict)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to max_seq_length instead of per batch (static shapes)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test examples."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo tokenisation instead of using the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    metric_source: str = field(
        default="auto",
        metadata={
            "help": "auto: evaluate.load('glue') if reachable, else offline; evaluate: fail without it; offline.",
            "choices": ["auto", "evaluate", "offline"],
        },
    )

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"unknown --task_name {self.task_name!r}; choose from {', '.join(TASK_TO_KEYS)}")
        elif self.train_file is None and self.validation_file is None:
            raise ValueError("give --task_name, or --train_file/--validation_file (or both)")
        for path in (self.train_file, self.validation_file, self.validation_mismatched_file, self.test_file):
            if path is not None and Path(path).suffix not in (".csv", ".json", ".jsonl"):
                raise ValueError(f"{path}: expected a .csv, .json or .jsonl file")


@dataclass
class SharpnessArguments:
    sharpness_samples: int = field(
        default=0, metadata={"help": "Measure lambda_max of the training loss's Hessian at the end of training on a "
                                     "fixed sample of this many training examples (0: off)."})
    sharpness_every: int = field(
        default=0, metadata={"help": "With --sharpness_samples: also every N optimizer steps (0: at the end only)."})
    sharpness_seed: int = field(
        default=0, metadata={"help": "Draws the sample (and the Lanczos start): keep it fixed to compare runs."})
    sharpness_batch_size: int | None = field(
        default=None, metadata={"help": "Examples per forward pass of a measurement (default: the train batch)."})

    def __post_init__(self):
        for name in ("sharpness_samples", "sharpness_every", "sharpness_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 0")
        if self.sharpness_batch_size is not None and self.sharpness_batch_size < 1:
            raise ValueError(f"--sharpness_batch_size {self.sharpness_batch_size}: must be >= 1")

    def callback(self):
        """The SharpnessCallback these flags ask for, or None."""
        if not self.sharpness_samples:
            return None
        # every=0 means at the end only: a period no run reaches, with the callback's at-the-end measurement
        return sam_hf.SharpnessCallback(every=self.sharpness_every or sys.maxsize, samples=self.sharpness_samples,
                                        seed=self.sharpness_seed, batch_size=self.sharpness_batch_size)


def sharpness_results(log_history: list[dict], flags: SharpnessArguments, train_samples: int) -> dict:
    """The measurements a SharpnessCallback logged: the last one (the final model) and the curve."""
    measured = [e for e in log_history if "sharpness/lambda_max" in e]
    if not measured:
        return {}
    return {
        "lambda_max": measured[-1]["sharpness/lambda_max"],  # measured at the end of training
        "step": measured[-1]["step"],
        "samples": min(flags.sharpness_samples, train_samples),
        "seed": flags.sharpness_seed,
        "seconds": measured[-1]["sharpness/seconds"],
        "curve": [[e["step"], e["sharpness/lambda_max"]] for e in measured],
    }


def load_raw_datasets(data_args, model_args):
    """The raw splits, and the (split, metric suffix) pairs to evaluate on."""
    task = data_args.task_name
    local = {
        "train": data_args.train_file,
        "validation": data_args.validation_file,
        "validation_mismatched": data_args.validation_mismatched_file,
        "test": data_args.test_file,
    }
    local = {split: path for split, path in local.items() if path is not None}
    if task is not None and not local:
        raw = datasets.load_dataset("nyu-mll/glue", task, cache_dir=model_args.cache_dir, token=model_args.token)
        if task == "mnli":  # the Hub names MNLI's splits by genre match
            return raw, [("validation_matched", ""), ("validation_mismatched", "_mm")], "test_matched"
        return raw, [("validation", "")], "test"
    # json covers json lines; every local file must share one format.
    builder = "csv" if Path(next(iter(local.values()))).suffix == ".csv" else "json"
    raw = datasets.load_dataset(builder, data_files=local, cache_dir=model_args.cache_dir)
    evals = [("validation", "")] + ([("validation_mismatched", "_mm")] if "validation_mismatched" in raw else [])
    return raw, evals, "test"


def label_setup(raw, task):
    """(is_regression, label_list, label_to_id): label_to_id maps stored labels to ids, None if they are ids."""
    reference = raw["train"] if "train" in raw else next(iter(raw.values()))
    feature = reference.features["label"]
    if task == "stsb" or (task is None and feature.dtype.startswith("float")):
        return True, None, None
    if isinstance(feature, datasets.ClassLabel):  # the Hub's GLUE: already ids
        return False, feature.names, None
    if task is not None:
        names = GLUE_LABELS[task]
        return False, names, ({name: i for i, name in enumerate(names)} if feature.dtype == "string" else None)
    label_list = sorted(set(reference["label"]))  # any other local data: sorted distinct labels
    return False, label_list, {label: i for i, label in enumerate(label_list)}


def sentence_keys(raw, task):
    if task is not None:
        return TASK_TO_KEYS[task]
    columns = [c for c in next(iter(raw.values())).column_names if c not in ("label", "idx")]
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    return (columns[0], columns[1]) if len(columns) > 1 else (columns[0], None)


def build_compute_metrics(task, is_regression, source, cache_dir=None):
    hub_metric = None
    offline_env = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                      for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))
    if task is not None and (source == "evaluate" or (source == "auto" and not offline_env)):
        try:
            import evaluate

            hub_metric = evaluate.load("glue", task, cache_dir=cache_dir)
        except Exception as err:  # no Hub: same definitions, computed here
            if source == "evaluate":
                raise
            logger.warning("evaluate.load('glue', %r) failed (%s); computing GLUE metrics offline", task, err)
    elif task is not None:
        logger.info("HF_HUB_OFFLINE is set: GLUE metrics computed by glue_metrics.py")

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        if hub_metric is not None:
            result = hub_metric.compute(predictions=preds, references=p.label_ids)
        elif task is not None:
            result = compute_glue_metrics(task, preds, p.label_ids)
        elif is_regression:
            result = {"mse": float(((preds - p.label_ids) ** 2).mean())}
        else:
            result = {"accuracy": float((preds == p.label_ids).mean())}
        if len(result) > 1:  # as HF's run_glue: one number for model selection
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, SharpnessArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, sharp_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, sharp_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("optim=%s optim_args=%s", training_args.optim, training_args.optim_args)

    set_seed(training_args.seed)
    task = data_args.task_name
    raw, eval_splits, predict_split = load_raw_datasets(data_args, model_args)
    is_regression, label_list, label_to_id = label_setup(raw, task)
    num_labels = 1 if is_regression else len(label_list)

    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
               trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path, num_labels=num_labels, finetuning_task=task, **hub
    )
    if label_list is not None:
        names = [str(label) for label in label_list]
        config.label2id = {name: i for i, name in enumerate(names)}
        config.id2label = dict(enumerate(names))
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
    )

    key1, key2 = sentence_keys(raw, task)
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning("max_seq_length %d > the tokenizer's %d: using the latter",
                       data_args.max_seq_length, tokenizer.model_max_length)
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples):
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if "label" in examples:
            labels = examples["label"]
            if label_to_id is not None:
                labels = [label_to_id[label] for label in labels]
            result["label"] = labels
        return result

    def prepare(split, max_samples, keep_label=True):
        if split not in raw:
            raise ValueError(f"no {split!r} split: give the matching --*_file or --task_name")
        data = raw[split]
        if max_samples is not None:  # select before tokenising: cheaper on big tasks
            data = data.select(range(min(max_samples, len(data))))
        if not keep_label and "label" in data.column_names:  # test rows: -1 on the Hub, None in local files
            data = data.remove_columns("label")
        drop = [c for c in data.column_names if c != "label"]
        return data.map(preprocess, batched=True, remove_columns=drop, num_proc=data_args.preprocessing_num_workers,
                        load_from_cache_file=not data_args.overwrite_cache, desc=f"Tokenising {split}")

    with training_args.main_process_first(desc="dataset map pre-processing"):
        train_dataset = prepare("train", data_args.max_train_samples) if training_args.do_train else None
        eval_sets = {s: prepare(s, data_args.max_eval_samples) for s, _ in eval_splits} if training_args.do_eval else {}
        predict_dataset = (prepare(predict_split, data_args.max_predict_samples, keep_label=False)
                           if training_args.do_predict else None)

    if data_args.pad_to_max_length:
        collator = default_data_collator
    else:  # multiples of 8 keep tensor cores busy under mixed precision
        mixed = training_args.fp16 or training_args.bf16
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if mixed else None)

    trainer = sam_hf.SharpnessTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=next(iter(eval_sets.values()), None),
        compute_metrics=build_compute_metrics(task, is_regression, data_args.metric_source, model_args.cache_dir),
        processing_class=tokenizer,
        data_collator=collator,
    )
    sharpness = sharp_args.callback() if training_args.do_train else None
    if sharpness is not None:
        trainer.add_callback(sharpness)

    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        if model_args.save_model:
            trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
        if sharpness is not None:
            measured = sharpness_results(trainer.state.log_history, sharp_args, len(train_dataset))
            logger.info("sharpness: lambda_max %.6g at step %s on %s training examples",
                        measured["lambda_max"], measured["step"], measured["samples"])
            trainer.save_metrics("sharpness", measured, combined=False)  # sharpness_results.json (rank 0)
            results["sharpness"] = measured

    if training_args.do_eval:
        combined = {}
        for split, suffix in eval_splits:  # MNLI: matched, then mismatched as eval_*_mm
            metrics = trainer.evaluate(eval_dataset=eval_sets[split])
            metrics["eval_samples"] = len(eval_sets[split])
            combined.update({key + suffix: value for key, value in metrics.items()})
        trainer.log_metrics("eval", combined)
        trainer.save_metrics("eval", combined)  # writes output_dir/eval_results.json
        results["eval"] = combined

    if training_args.do_predict:
        preds = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        path = Path(training_args.output_dir) / f"predict_results_{task or 'local'}.txt"
        if trainer.is_world_process_zero():
            with open(path, "w") as out:
                out.write("index\tprediction\n")
                for i, pred in enumerate(preds):
                    out.write(f"{i}\t{pred:3.3f}\n" if is_regression else f"{i}\t{config.id2label[int(pred)]}\n")
    return results


if __name__ == "__main__":
    main()
