"""Recipe data: a Hub dataset, a local image folder or local csv/jsonl, made ready for classification.

Images go through the model's image processor on the fly (no torchvision);
text is tokenized once with the model's tokenizer. Both keep exactly the
model's inputs plus `labels`, so Trainer needs no column pruning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .schema import DataSpec, RecipeError

# GLUE's input columns, in the order tried when data.text_columns is not given.
GLUE_TEXT_COLUMNS = [
    ("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
    ("premise", "hypothesis"), ("sentence",), ("text",),
]
LABEL_COLUMNS = ("label", "labels", "fine_label")
EVAL_SPLITS = ("validation", "validation_matched", "test")


@dataclass
class Splits:
    train: object  # datasets.Dataset
    eval: object
    kind: str  # "image" or "text"
    label_column: str
    label_names: list[str] | None  # None: a regression target (e.g. STS-B)
    image_column: str | None = None
    text_columns: tuple[str, ...] = ()
    test: object = None  # with data.validation_fraction: the eval split, reported after training as test_*


def load_splits(spec: DataSpec, seed: int) -> Splits:
    ds = _load(spec)
    if spec.train_split not in ds:
        raise RecipeError(f"data.train_split: no split {spec.train_split!r}; splits: {', '.join(ds)}")
    train = ds[spec.train_split]
    eval_name = spec.eval_split or next((s for s in EVAL_SPLITS if s in ds and s != spec.train_split), None)
    if spec.eval_split and spec.eval_split not in ds:
        raise RecipeError(f"data.eval_split: no split {spec.eval_split!r}; splits: {', '.join(ds)}")
    if eval_name is None:  # e.g. an image folder with no test/ subfolder
        parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = ds[eval_name]
    test = None
    if spec.validation_fraction is not None:  # model selection on held-out training data, test at the end
        parts = train.train_test_split(test_size=spec.validation_fraction, seed=seed)
        train, test, evaluation = parts["train"], evaluation, parts["test"]
    train = _limit(train, spec.max_train_samples, seed)
    evaluation = _limit(evaluation, spec.max_eval_samples, seed)
    test = None if test is None else _limit(test, spec.max_eval_samples, seed)
    splits = _describe(train, evaluation, spec)
    splits.test = test
    return splits


def _load(spec: DataSpec):
    import datasets

    if spec.dataset:
        key, args, kwargs = "dataset", (spec.dataset, spec.dataset_config), {}
    elif spec.image_folder:
        if not Path(spec.image_folder).is_dir():
            raise RecipeError(f"data.image_folder: {spec.image_folder!r} is not a directory")
        key, args, kwargs = "image_folder", ("imagefolder",), {"data_dir": spec.image_folder}
    else:
        files = {"train": spec.train_file, "validation": spec.validation_file}
        files = {split: f for split, f in files.items() if f}
        for f in files.values():
            if not Path(f).is_file():
                raise RecipeError(f"data: no file {f!r}")
        fmt, options = file_format(spec.train_file)
        key, args, kwargs = "train_file", (fmt,), {"data_files": files, **options}
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # offline without a cache, a bad file, ...: say which key to change
        raise RecipeError(f"data.{key} {getattr(spec, key)!r}: could not load it ({type(err).__name__}: {err}). "
                          "Offline? Point the recipe at local data with --data.image_folder DIR "
                          "or --data.train_file FILE") from err


def file_format(path: str) -> tuple[str, dict]:
    """The `datasets` builder (and its options) for a local data file: .csv, .tsv (csv with tabs), else json
    (JSON lines, or one JSON list of rows)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv", {"delimiter": "\t"} if suffix == ".tsv" else {}
    return "json", {}


def read_file(path: str, key: str = "data.train_file"):
    """One local data file (see `file_format`) as a `datasets.Dataset`; errors name the option `key` that gave it."""
    import datasets

    if not Path(path).is_file():
        raise RecipeError(f"{key}: no file {path!r}")
    fmt, options = file_format(path)
    try:
        return datasets.load_dataset(fmt, data_files={"train": path}, **options)["train"]
    except Exception as err:  # a malformed file: say which one
        raise RecipeError(f"{key} {path!r}: could not load it ({type(err).__name__}: {err})") from err


def text_columns(features) -> tuple[str, ...]:
    """The first of GLUE's input columns (GLUE_TEXT_COLUMNS) all present in `features`, or () if none are."""
    return next((k for k in GLUE_TEXT_COLUMNS if all(c in features for c in k)), ())


def _limit(ds, n: int | None, seed: int):
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def _describe(train, evaluation, spec: DataSpec) -> Splits:
    import datasets

    features = train.features
    label = spec.label_column or next((c for c in LABEL_COLUMNS if c in features), None)
    if label not in features:
        raise RecipeError(f"data.label_column: no label column {label!r}; columns: {', '.join(features)}")
    if isinstance(features[label], datasets.ClassLabel):
        names = list(features[label].names)
    elif features[label].dtype.startswith("float"):
        names = None
    else:
        values = set(train[label])
        if min(values) < 0:
            raise RecipeError(f"data: labels in {label!r} must be >= 0 (unlabelled test split?)")
        names = [str(i) for i in range(max(values) + 1)]
    image = spec.image_column or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image is not None:
        if image not in features:
            raise RecipeError(f"data.image_column: no column {image!r}; columns: {', '.join(features)}")
        return Splits(train, evaluation, "image", label, names, image_column=image)
    text = tuple(spec.text_columns or text_columns(features))
    missing = [c for c in text if c not in features]
    if not text or missing:
        raise RecipeError(f"data.text_columns: found no image column and no text columns "
                          f"{missing or ''} in {', '.join(features)}; set data.text_columns or data.image_column")
    return Splits(train, evaluation, "text", label, names, text_columns=text)


def prepare(splits: Splits, spec: DataSpec, processor, model_config):
    """(train, eval, data_collator) holding only the model's inputs and `labels`."""
    if splits.kind == "image":
        mode = "L" if getattr(model_config, "num_channels", 3) == 1 else "RGB"
        train = splits.train.with_transform(_image_transform(splits, spec, processor, mode, augment=True))
        evaluation = splits.eval.with_transform(_image_transform(splits, spec, processor, mode, augment=False))
        if splits.test is not None:
            splits.test = splits.test.with_transform(_image_transform(splits, spec, processor, mode, augment=False))
        return train, evaluation, None
    from transformers import DataCollatorWithPadding

    def encode(ds):
        return encode_text(ds, splits.text_columns, splits.label_column, processor, spec.max_length, model_config)

    if splits.test is not None:
        splits.test = encode(splits.test)
    return encode(splits.train), encode(splits.eval), DataCollatorWithPadding(processor)


def encode_text(ds, columns, label_column: str, tokenizer, max_length: int, model_config=None):
    """`ds` tokenized (the text `columns`, truncated to `max_length` tokens but never longer than the model's
    position table: small test models have short ones), holding only the tokenizer's outputs and `labels`."""
    max_length = min(max_length, getattr(model_config, "max_position_embeddings", max_length))

    def tokenize(batch):
        out = tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_length)
        out["labels"] = batch[label_column]
        return out

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names)


def _image_transform(splits: Splits, spec: DataSpec, processor, mode: str, augment: bool):
    """Training images get the recipe's augmentations (before the processor resizes them); every image is
    normalised with data.image_mean/image_std when given, else with the processor's own statistics."""
    from PIL import ImageOps

    normalise = {} if spec.image_mean is None else {"image_mean": list(spec.image_mean),
                                                    "image_std": list(spec.image_std)}

    def transform(batch):
        images = [img.convert(mode) for img in batch[splits.image_column]]
        if augment:
            if spec.inception_crop:
                images = [inception_crop(im) for im in images]
            if spec.crop_padding:
                images = [padded_crop(im, spec.crop_padding) for im in images]
            if spec.hflip:
                images = [ImageOps.mirror(im) if random.random() < 0.5 else im for im in images]
        pixels = processor(images, return_tensors="pt", **normalise)["pixel_values"]
        return {"pixel_values": pixels, "labels": batch[splits.label_column]}

    return transform


def padded_crop(image, padding: int):
    """A random crop of the image's own size from the image padded with `padding` black pixels per side
    (the CIFAR augmentation of SAMPa's Section 5.1)."""
    from PIL import ImageOps

    width, height = image.size
    padded = ImageOps.expand(image, border=padding, fill=0)
    left, top = random.randint(0, 2 * padding), random.randint(0, 2 * padding)
    return padded.crop((left, top, left + width, top + height))


def inception_crop(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """Inception-style random-resized crop (torchvision's RandomResizedCrop rule): a random area in
    `scale` of the image and aspect ratio in `ratio` (log-uniform); the centre crop when no draw fits.
    The processor then resizes the crop to the model's input size."""
    import math

    width, height = image.size
    area = width * height
    for _ in range(attempts):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            return image.crop((left, top, left + w, top + h))
    aspect = width / height  # fallback: the largest centre crop within the ratio bounds
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))
