"""Every bad `optim_args` fails before the first step, naming the key, the value and what would work."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_hf
from sam_hf import SharpnessConfig, SharpnessConfigError
from sam_hf import registry
from sam_hf.config import BASE_KEY_TYPES, parse_optim_args
from tests.helpers.tiny import MeanLossModel, args, vector_data

BAD = [
    ("sam", "rho=0", ["rho=0.0", "> 0"]),
    ("sam", "rho=-0.1", ["rho=-0.1", "> 0"]),
    ("sam", "rho=big", ["rho='big'", "not a number", "rho=0.05"]),
    ("sam", "base=sgd,momentum=abc", ["momentum='abc'", "not a number", "momentum=0.9"]),
    ("sam", "base=sgd,nesterov=ture", ["nesterov='ture'", "nesterov=true"]),
    ("sam", "base=sgd,momentum=-0.5", ["momentum='-0.5'", ">= 0"]),
    ("sam", "rho=nan", ["rho='nan'", "finite"]),
    ("sam", "adaptive=maybe", ["adaptive='maybe'", "adaptive=true"]),
    ("sam", "eta=-1", ["eta=-1.0", ">= 0"]),
    ("sampa", "lam=1.5", ["lam=1.5", "[0, 1]"]),
    ("sampa", "lam=-0.1", ["lam=-0.1", "[0, 1]"]),
    ("msam", "micro_batches=0", ["micro_batches=0", ">= 1"]),
    ("msam", "micro_batches=2.5", ["micro_batches='2.5'", "integer", "micro_batches=8"]),
    ("asyncsam", "ascent_batch_ratio=0", ["ascent_batch_ratio=0.0", "(0, 1]"]),
    ("asyncsam", "ascent_batch_ratio=1.5", ["ascent_batch_ratio=1.5", "(0, 1]"]),
    ("sampa", "lookahead=adam", ["lookahead='adam'", "optimizer", "sgd"]),
    ("sampa", "parallel=maybe", ["parallel='maybe'", "auto, on or off"]),
    ("sam", "sync_ascent=2", ["sync_ascent='2'", "true"]),
    ("sam", "bn_stats=never", ["bn_stats='never'", "clean"]),
    ("asyncsam", "ascent_device=gpu", ["ascent_device='gpu'", "auto", "cpu"]),
    ("sampa", "ascent_device=cpu", ["ascent_device=cpu", "asyncsam only"]),
    # a key another method takes would be silently ignored: refused, naming the method it belongs to
    ("sam", "rho=0.05,lam=0.2", ["lam=0.2", "applies to sampa only", "--optim sam", "drop lam"]),
    ("sampa", "micro_batches=0", ["micro_batches=0", ">= 1"]),  # mSAM + SAMPa takes micro_batches (issue 19)
    ("msam", "parallel=on", ["parallel=on", "sampa and asyncsam only"]),
    ("sam", "rho=0.05 lam=0.2", ["'rho=0.05 lam=0.2'", "separate them with commas"]),
    ("asyncsam", "ascent_device=cpu,parallel=off", ["ascent_device='cpu'", "parallel=off"]),
    ("asyncsam", "ascent_threads=4", ["ascent_threads=4", "ascent_device=cpu"]),
    ("asyncsam", "ascent_device=cpu,ascent_threads=-1", ["ascent_threads=-1", ">= 0"]),
    ("sam", "rhoo=0.1", ["rhoo='0.1'", "unknown key", "rho"]),
    ("sam", "momentum=0.9", ["momentum='0.9'", "unknown key"]),  # momentum is sgd's, not adamw's
    ("sam", "base=sgd,momentun=0.9", ["momentun", "sgd takes", "momentum"]),
    ("sam", "base=adamw_nope", ["base='adamw_nope'", "adamw_torch"]),
    ("sam", "base=sampa", ["base='sampa'", "plain optimizer"]),
    ("sam", "base=lomo", ["base='lomo'", "adamw_torch"]),
    ("sampa", "base=adagrad", ["lookahead=optimizer", "base='adagrad'", "lookahead=sgd"]),
    # Trainer's parameter groups set weight_decay themselves: the key would be read and silently dropped
    ("sam", "base=sgd,momentum=0.9,weight_decay=0.5", ["weight_decay='0.5'", "ignored", "--weight_decay"]),
    ("msam", "base=rmsprop,weight_decay=0.1", ["weight_decay='0.1'", "--weight_decay"]),
    ("sam", "base=adagrad,weight_decay=0.1", ["weight_decay='0.1'", "--weight_decay"]),
    ("sam", "weight_decay=0.1", ["weight_decay='0.1'", "--weight_decay"]),
    ("sam", "base=sgd,lr=0.1", ["lr='0.1'", "--learning_rate"]),
    ("sam", "interval=0", ["interval=0", ">= 1"]),
    ("msam", "interval=two", ["interval='two'", "integer"]),
    ("sam", "start=1.5", ["start=1.5", "[0, 1]"]),
    ("sam", "stop=-0.1", ["stop=-0.1", "[0, 1]"]),
    ("sam", "start=0.8,stop=0.5", ["start=0.8", "stop=0.5"]),
    ("sampa", "interval=2", ["interval=2", "sam and msam", "g_t"]),
    ("asyncsam", "start=0.5", ["start=0.5", "sam and msam"]),
    ("sampa", "exchange_dtype=fp16", ["exchange_dtype='fp16'", "fp32", "bf16"]),
    ("sampa", "exchange_dtype=bf16", ["exchange_dtype='bf16'", "role exchange", "ignored"]),  # one process
    ("sam", "rho", ["'rho'", "key=value"]),
    ("sampa", "rho=0.05 lam=0.2", ["'rho=0.05 lam=0.2'", "commas", '"rho=0.05,lam=0.2"']),  # not rho='0.05lam=0.2'
    ("sampa", "rho=0.05 lam", ["'rho=0.05 lam'", "space", "comma-separated"]),
    ("sam", "rho=0.1,rho=0.2", ["'rho'", "twice"]),
]


@pytest.mark.parametrize("method,optim_args,needles", BAD, ids=[b[1] for b in BAD])
def test_bad_optim_args_fail_before_training(tmp_path, method, optim_args, needles):
    with pytest.raises(SharpnessConfigError) as err:
        sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(tmp_path, method, optim_args),
                                train_dataset=vector_data())
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_micro_batches_larger_than_the_step_batch(tmp_path):
    with pytest.raises(SharpnessConfigError, match=r"micro_batches=16 .* 8 samples .* micro_batches <= 8"):
        sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(tmp_path, "msam", "micro_batches=16"),
                                train_dataset=vector_data())
    # with accumulation the step's batch is larger, so 16 fits
    sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(tmp_path, "msam", "micro_batches=16",
                                                             gradient_accumulation_steps=2),
                            train_dataset=vector_data())


def test_defaults_and_values():
    cfg = SharpnessConfig.from_optim_args("sampa", None)
    assert (cfg.rho, cfg.lam, cfg.adaptive, cfg.eta, cfg.base, cfg.lookahead, cfg.parallel) == (
        0.05, 0.2, False, 0.01, "adamw_torch", "optimizer", "auto")
    assert SharpnessConfig.from_optim_args("msam", None).micro_batches == 8
    cfg = SharpnessConfig.from_optim_args("asyncsam", " rho=0.1, ascent_batch_ratio=auto, adaptive=TRUE ")
    assert (cfg.rho, cfg.ascent_batch_ratio, cfg.adaptive) == (0.1, "auto", True)


def test_base_optimizer_keys_pass_through(tmp_path):
    trainer = sam_hf.SharpnessTrainer(
        model=MeanLossModel(), train_dataset=vector_data(),
        args=args(tmp_path, "sam", "rho=0.1,base=sgd,momentum=0.9,nesterov=true", max_steps=1))
    trainer.train()
    base = trainer._sharpness_optimizer.base
    assert isinstance(base, torch.optim.SGD)
    assert base.defaults["momentum"] == 0.9 and base.defaults["nesterov"] is True
    assert trainer.sharpness_config.rho == 0.1


def test_weight_decay_comes_from_training_arguments(tmp_path):
    """What the rejected key would have set, --weight_decay does: on weights, not on biases and LayerNorm."""
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                      args=args(tmp_path, "sam", "base=sgd,momentum=0.9", weight_decay=0.5,
                                                max_steps=1))
    assert [g["weight_decay"] for g in trainer.create_optimizer().param_groups] == [0.5, 0.0]


# ---- any optim_args string: a valid config, or a SharpnessConfigError that names the key (property-based)

KEYS = [f.name for f in dataclasses.fields(SharpnessConfig) if f.name not in ("method", "base_optim_args")]
KEYS += [*BASE_KEY_TYPES, "lr", "rhoo", "method"]
VALUES = ["0", "1", "-1", "0.05", "0.5", "2.5", "1e999", "nan", "inf", "true", "false", "TRUE", "auto", "cpu", "gpu",
          "sgd", "adamw_torch", "adagrad", "sampa", "lomo", "bf16", "fp16", "on", "off", "clean", "optimizer", "8", ""]
PIECES = st.one_of(
    st.builds(lambda k, sep, v: f"{k}{sep}{v}", st.one_of(st.sampled_from(KEYS), st.text(max_size=6)),
              st.sampled_from(["=", " = ", "", "==", "= "]), st.one_of(st.sampled_from(VALUES), st.text(max_size=6))),
    st.text(max_size=10))
OPTIM_ARGS = st.one_of(st.none(), st.text(max_size=40),
                       st.builds(lambda sep, ps: sep.join(ps), st.sampled_from([",", ", ", " ", " , ", ",,"]),
                                 st.lists(PIECES, max_size=5)))
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


@PROPERTY
@given(method=st.sampled_from(registry.names()), optim_args=OPTIM_ARGS)
def test_any_optim_args_give_a_config_or_an_error_naming_the_key(method, optim_args):
    try:
        cfg = SharpnessConfig.from_optim_args(method, optim_args)
    except SharpnessConfigError as err:
        message = str(err)
        assert message.startswith("optim_args: "), message
        keys = [p.strip().partition("=")[0].strip() for p in optim_args.split(",") if p.strip()]
        # a key as the user wrote it (shown with repr, so control characters are escaped) is in the message
        assert any(k in message or repr(k)[1:-1] in message for k in keys), (optim_args, message)
        return
    assert cfg.method == method
    cfg.validate()
    given_keys = set(parse_optim_args(optim_args))
    assert set(cfg.base_optim_args) <= given_keys and given_keys <= {*KEYS}


@PROPERTY
@given(pairs=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.from_regex(r"[a-z0-9.+-]{1,8}",
                                                                                         fullmatch=True), max_size=5),
       seps=st.sampled_from([(",", "="), (", ", "="), (" ,", " = ")]))
def test_parse_optim_args_reads_back_what_it_is_given(pairs, seps):
    comma, equals = seps
    assert parse_optim_args(comma.join(f"{k}{equals}{v}" for k, v in pairs.items())) == pairs
