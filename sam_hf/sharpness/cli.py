"""`sam-hf sharpness MODEL_DIR --train_file F`: lambda_max (and trace) of a saved text classifier.

The data is read and tokenized as the recipes read it (sam_hf.recipes.data: `read_file`, `text_columns`,
`encode_text`); only the labels are this command's own, since they must be the saved model's class ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .batches import by_length
from .hessian import measure_sharpness

DESCRIPTION = """\
Measure the Hessian sharpness of a saved text classifier on a fixed sample of its training data:
lambda_max (and the top K eigenvalues) by Lanczos, the trace by Hutchinson, printed and written as JSON.

MODEL_DIR: a folder written by save_pretrained (e.g. a Trainer's output_dir) holding a sequence-
classification model (AutoModelForSequenceClassification) and its tokenizer (AutoTokenizer). The model is
loaded in float32 and measured in eval mode, with respect to all its parameters.

--train_file: GLUE-style data, as JSON lines (.jsonl, or .json holding lines or one list) or CSV/TSV (.csv,
.tsv), with the text in `sentence`, or a pair in `sentence1`/`sentence2` (also premise/hypothesis,
question1/question2, question/sentence, or `text`), and a `label` column: class ids, or label names from the
model's config (label2id), or floats for a regression model (num_labels=1). Other models and tasks: call
sam_hf.measure_sharpness(model, batches) from Python.

Cost: a forward and a backward over the sample to build the gradient graphs, then one backward through them
per Lanczos iteration (lambda_max alone: 8 to about 16) and per trace probe."""


def label_ids(values: list, config) -> list:
    """The labels as the model's class ids (names looked up in config.label2id), or floats for regression."""
    if any(value is None for value in values):
        raise ValueError("--train_file: every row needs a `label`")
    if config.num_labels == 1:  # regression
        return [float(v) for v in values]
    names = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    out = []
    for value in values:
        if isinstance(value, (int, float)) or str(value).strip().lstrip("-").isdigit():
            out.append(int(float(value)))
        elif str(value) in names:
            out.append(names[str(value)])
        else:
            raise ValueError(f"--train_file: label {value!r} is neither a class id nor one of the model's label "
                             f"names {sorted(names)}")
        if not 0 <= out[-1] < config.num_labels:
            raise ValueError(f"--train_file: label {value!r} is outside the model's {config.num_labels} classes")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sam-hf sharpness", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the saved model and tokenizer")
    parser.add_argument("--train_file", required=True, help="JSON lines or CSV/TSV with text columns and `label`")
    parser.add_argument("--samples", type=int, default=256, help="examples in the sample, picked with --seed "
                                                                 "(default 256; all rows if fewer)")
    parser.add_argument("--top_k", type=int, default=1, help="top eigenvalues to compute (default 1)")
    parser.add_argument("--trace_samples", type=int, default=0, help="Hutchinson probes for the trace (0: none)")
    parser.add_argument("--batch_size", type=int, default=32, help="examples per forward pass (default 32)")
    parser.add_argument("--max_seq_length", type=int, default=128, help="tokens per example, truncated (128)")
    parser.add_argument("--seed", type=int, default=0, help="picks the sample, the Lanczos start and the probes")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative accuracy of the eigenvalues (1e-3)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default=None, help="the JSON file to write (default MODEL_DIR/sharpness.json)")
    args = parser.parse_args(argv)
    for name, low in (("samples", 1), ("top_k", 1), ("trace_samples", 0), ("batch_size", 1),
                      ("max_seq_length", 1), ("seed", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name} {getattr(args, name)}: must be >= {low}")
    if not Path(args.model_dir, "config.json").is_file():
        parser.error(f"MODEL_DIR {args.model_dir}: no config.json there (a folder written by save_pretrained)")
    if not Path(args.train_file).is_file():
        parser.error(f"--train_file {args.train_file}: no such file")
    return args


def sample_batches(args, model, tokenizer) -> tuple[list, tuple[str, ...]]:
    """`--samples` rows picked with `--seed`, tokenized, sorted by length and cut into padded batches of
    `--batch_size` (batches.by_length); and the text columns read."""
    from transformers import DataCollatorWithPadding

    from ..recipes.data import encode_text, read_file, text_columns

    rows = read_file(args.train_file, key="--train_file")
    if len(rows) == 0:
        raise ValueError(f"--train_file {args.train_file}: no rows")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
    rows = rows.select(sorted(order[:args.samples].tolist()))
    columns = text_columns(rows.features)
    if not columns:
        raise ValueError(f"--train_file: no text columns found among {sorted(rows.column_names)}; expected "
                         "sentence, sentence1+sentence2, premise+hypothesis, question1+question2, "
                         "question+sentence or text")
    if "label" not in rows.column_names:
        raise ValueError(f"--train_file {args.train_file}: every row needs a `label`")
    rows = rows.remove_columns("label").add_column("label", label_ids(rows["label"], model.config))
    encoded = encode_text(rows, columns, "label", tokenizer, args.max_seq_length, model.config)
    features = by_length([encoded[i] for i in range(len(encoded))])
    collate = DataCollatorWithPadding(tokenizer)
    return [collate(features[i:i + args.batch_size]) for i in range(0, len(features), args.batch_size)], columns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..recipes.schema import RecipeError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    try:
        batches, columns = sample_batches(args, model, tokenizer)
    except (ValueError, RecipeError) as err:
        print(f"sam-hf sharpness: {err}", file=sys.stderr)
        return 2
    result = measure_sharpness(model, batches, top_k=args.top_k, trace_samples=args.trace_samples,
                               seed=args.seed, tol=args.tol)

    print(f"lambda_max        {result['lambda_max']:.6g}")
    if args.top_k > 1:
        print(f"top {args.top_k} eigenvalues  " + ", ".join(f"{v:.6g}" for v in result["top_eigenvalues"]))
    if result["trace"] is not None:
        spread = f" +- {result['trace_stderr']:.3g}" if result["trace_stderr"] is not None else ""
        print(f"trace             {result['trace']:.6g}{spread} ({args.trace_samples} Rademacher probes)")
    print(f"{result['num_samples']} examples, {result['num_parameters']:,} parameters, "
          f"{result['hessian_vector_products']} Hessian-vector products, {result['seconds']:.1f} s")
    output = Path(args.output or Path(args.model_dir, "sharpness.json"))
    first, second = (*columns, None)[:2]
    record = {"model_dir": str(args.model_dir), "train_file": str(args.train_file), "seed": args.seed,
              "top_k": args.top_k, "trace_samples": args.trace_samples, "text_columns": [first, second], **result}
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
