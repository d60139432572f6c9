#!/usr/bin/env python
"""A text-classification training script written the way Hugging Face's examples are (run_glue.py & co.):
dataclass arguments parsed with HfArgumentParser, a model built from its config, a Trainer, train, save.

It knows nothing of sharpness-aware training: tests run it directly and through `sam-hf launch`. Everything
is local (a tiny BERT from a config, random token data), so it runs offline in seconds.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import (BertConfig, BertForSequenceClassification, HfArgumentParser, Seq2SeqTrainer,
                          Seq2SeqTrainingArguments, Trainer, TrainingArguments, set_seed)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    hidden_size: int = field(default=16, metadata={"help": "Hidden size of the tiny BERT."})
    num_labels: int = field(default=2, metadata={"help": "Number of classes."})
    trainer: str = field(default="plain", metadata={"help": "Which Trainer to build.",
                                                    "choices": ["plain", "seq2seq", "custom"]})


@dataclass
class DataArguments:
    num_samples: int = field(default=32, metadata={"help": "Training examples to generate."})
    max_seq_length: int = field(default=8, metadata={"help": "Tokens per example."})
    vocab_size: int = field(default=50, metadata={"help": "Vocabulary size."})


class CustomTrainer(Trainer):
    """A Trainer subclass of the script's own, as some examples define (here: it only counts its losses)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_calls = getattr(self, "loss_calls", 0) + 1
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def main():
    # Seq2Seq examples parse Seq2SeqTrainingArguments; the others TrainingArguments.
    seq2seq = "--trainer" in sys.argv and sys.argv[sys.argv.index("--trainer") + 1:][:1] == ["seq2seq"]
    training_cls = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    parser = HfArgumentParser((ModelArguments, DataArguments, training_cls))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(level=logging.WARNING)
    logger.info("Training parameters %s", training_args)
    print(f"[rank {training_args.process_index}] device={training_args.device.type} "
          f"ddp_backend={training_args.ddp_backend} ACCELERATE_USE_CPU={os.environ.get('ACCELERATE_USE_CPU')}",
          flush=True)
    set_seed(training_args.seed)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, data_args.vocab_size, (data_args.num_samples, data_args.max_seq_length), generator=g)
    labels = ids[:, 0] % model_args.num_labels
    train_dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    config = BertConfig(vocab_size=data_args.vocab_size, hidden_size=model_args.hidden_size, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
                        num_labels=model_args.num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)

    trainer_cls = {"plain": Trainer, "seq2seq": Seq2SeqTrainer, "custom": CustomTrainer}[model_args.trainer]
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset)
    result = trainer.train()
    trainer.save_model()

    info = {
        "argv0": sys.argv[0],
        "name": __name__,
        "trainer_class": type(trainer).__name__,
        "mro": [c.__name__ for c in type(trainer).__mro__],
        "args_class": type(training_args).__name__,
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optimizer": repr(getattr(trainer.optimizer, "optimizer", trainer.optimizer)),
        "loss_calls": getattr(trainer, "loss_calls", None),
        "train_loss": result.training_loss,
        "log_history": trainer.state.log_history,
        "world_size": training_args.world_size,
    }
    with open(os.path.join(training_args.output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
