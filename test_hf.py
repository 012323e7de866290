"""Interop with transformers: parity of every supported class on every CPU backend, padded and
unpadded; tinyencoder_hf.save read back by transformers' Auto classes; checkpoint quirks, errors."""

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    CPU_BACKENDS,
    assert_close,
    assert_ran,
    batch,
    perturb,
    run_python,
    run_without,
    tiny,
    tiny_checkpoint,
    variant,
)
import pipelines
import tinyencoder_hf
from tinyencoder import CLS, MASK, PAD, SEP, VOCAB_SIZE, Config, TinyEncoder, byte_ids

# -------------------------------------------------------------------------------------------------
# 1. Parity with transformers on random weights: their save_pretrained -> tinyencoder_hf.load
HF_CLASSES = (
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertModel",
    "RobertaForMaskedLM",
    "RobertaModel",
    "ModernBertForMaskedLM",
    "ModernBertModel",
    *(
        f"{stem}For{task}Classification"
        for stem in ("Bert", "Roberta", "ModernBert")
        for task in ("Sequence", "Token")
    ),
    "ModernBertForSequenceClassification:mean",  # classifier_pooling="mean"
    *(f"{stem}ForQuestionAnswering" for stem in ("Bert", "Roberta", "ModernBert")),
    *(f"{stem}ForMultipleChoice" for stem in ("Bert", "Roberta", "ModernBert")),
    "ModernBertForMultipleChoice:mean",
)
CHOICE_LENS = (24, 19, 11, 24)  # two questions of two choices each


def hf_inputs(name, pad=PAD, lens=(24, 19, 11)):
    """ids, mask and keyword arguments for a class: (B, T) rows, or (B, choices, T) for multiple
    choice; BERT's second segment from token 9 on."""
    if "MultipleChoice" in name:
        lens = CHOICE_LENS
    ids, mask = batch(lens, lo=2, hi=VOCAB_SIZE, pad=pad)  # lo=2: no RoBERTa pad id among tokens
    if "MultipleChoice" in name:
        ids, mask = ids.unflatten(0, (2, 2)), mask.unflatten(0, (2, 2))
    kw = dict(attention_mask=mask)
    if name.startswith("Bert"):
        kw["token_type_ids"] = (torch.arange(ids.shape[-1]) >= 9).long().expand_as(ids)
    return ids, mask, kw


def hf_logits(ref, name):
    """transformers' output as our logits: a span head's start and end side by side, (..., 2)."""
    if "QuestionAnswering" in name:
        return torch.stack([ref.start_logits, ref.end_logits], dim=-1)
    if name == "BertForPreTraining":
        return ref.prediction_logits
    return ref.logits


# Each family's small config, beyond the sizes all share. ModernBERT's 4 layers: global at 0 and 2,
# a window of 8 under rows of 24, a pad id other than its default 50283.
FAMILY_CONFIGS = {
    "ModernBert": dict(
        num_hidden_layers=4,
        max_position_embeddings=256,
        local_attention=8,
        global_attn_every_n_layers=2,
        pad_token_id=300,
        bos_token_id=CLS,
        cls_token_id=CLS,
        eos_token_id=SEP,
        sep_token_id=SEP,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 20000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        },
    ),
    "Roberta": dict(
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    ),
    "Bert": dict(max_position_embeddings=64, pad_token_id=0),
}


def edit_config(folder, **changes):
    """folder's config.json with changes (new keys last), as a hand-edited or another tool's is."""
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def skip_unless_all_global_modernbert_builds(transformers):
    """transformers 5.13 cannot build a ModernBertConfig without a local layer: with every layer
    full_attention, its rope_parameters (keyed by both layer kinds) are read as one flat dict and
    refused (modeling_rope_utils tests the keys with issubset(layer_types); 5.17, isdisjoint)."""
    try:
        transformers.ModernBertConfig(num_hidden_layers=1)
    except Exception as e:  # StrictDataclassFieldValidationError
        version = transformers.__version__
        pytest.skip(f"transformers {version} builds no all-global ModernBERT ({e!r:.40})")


def hf_model(transformers, name, attn, num_labels=3, **over):
    """A small transformers model of class name (":mean" after it: mean pooling), its config
    changed by over, with every parameter moved away from its init."""
    name, _, pooling = name.partition(":")
    if "QuestionAnswering" in name:  # qa_outputs: a start and an end logit
        num_labels = 2
    family = next(stem for stem in FAMILY_CONFIGS if name.startswith(stem))
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    config = dict(sizes, num_labels=num_labels, vocab_size=VOCAB_SIZE, attn_implementation=attn)
    config.update(copy.deepcopy(FAMILY_CONFIGS[family]))  # transformers may edit it in place
    if family == "ModernBert":
        config["classifier_pooling"] = pooling or "cls"
    config.update(over)
    model = getattr(transformers, name)(getattr(transformers, family + "Config")(**config))
    return perturb(model).eval()


@pytest.mark.parametrize("attn", CPU_BACKENDS)
@pytest.mark.parametrize("name", HF_CLASSES)
def test_parity_with_transformers(name, attn, tmp_path, kernels):
    transformers = pytest.importorskip(
        "transformers", reason="parity tests compare against transformers"
    )
    hf = hf_model(transformers, name, attn)
    hf.save_pretrained(tmp_path)
    ids, mask, kw = hf_inputs(name, hf.config.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw)
    loaded = tinyencoder_hf.load(str(tmp_path)).eval()
    assert loaded.cfg.nsp == (name == "BertForPreTraining")
    assert loaded.cfg.classifier_pooling == (name.partition(":")[2] or "cls")
    keep = mask.bool()
    kernels.clear()  # transformers' own calls do not count
    for unpad in (False, True):
        model = variant(loaded, attn_backend=attn, unpad=unpad)
        with torch.no_grad():
            out = model(ids, **kw)
        assert_ran(kernels, attn, unpad)
        if name.endswith("Model"):
            assert_close(out.hidden[keep], ref.last_hidden_state[keep])
        elif "SequenceClassification" in name or "MultipleChoice" in name:
            assert out.logits.shape == ref.logits.shape
            assert_close(out.logits, ref.logits)
        else:
            assert_close(out.logits[keep], hf_logits(ref, name)[keep])
        if name == "BertForPreTraining":
            assert_close(out.nsp_logits, ref.seq_relationship_logits)


@pytest.mark.parametrize(
    "name",
    [
        "RobertaForMaskedLM",
        "ModernBertForMaskedLM",
        "ModernBertForTokenClassification",
        "ModernBertForMultipleChoice",
        "ModernBertForMultipleChoice:mean",
    ],
)
def test_parity_on_left_padded_rows(name, tmp_path):
    """Left padding: RoBERTa counts positions from each row's first real token, ModernBERT's RoPE
    is relative, and its choice head pools the first real token, as ours does. (BERT counts its
    positions from the row's first slot, padding or not, where ours start at the text.)"""
    transformers = pytest.importorskip("transformers", reason="parity against transformers")
    hf = hf_model(transformers, name, "sdpa")
    hf.save_pretrained(tmp_path)
    ids, mask, kw = hf_inputs(name, hf.config.pad_token_id)
    ids, mask = ids.flip(-1), mask.flip(-1)
    loaded = tinyencoder_hf.load(str(tmp_path)).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        for unpad in (False, True):
            out = variant(loaded, unpad=unpad)(ids, mask).logits
            if "MultipleChoice" in name:
                assert_close(out, ref)
            else:
                assert_close(out[mask.bool()], ref[mask.bool()])


# -------------------------------------------------------------------------------------------------
# 2. tinyencoder_hf.save -> transformers Auto classes, and back
CLASSIFIERS = [
    ("bert", {"nsp": False, "classifier": "sequence", "num_labels": 3}),
    ("bert", {"nsp": False, "classifier": "token", "num_labels": 3}),
    ("roberta", {"classifier": "sequence", "num_labels": 1}),
    ("roberta", {"classifier": "token", "num_labels": 3}),
    ("modernbert", {"classifier": "sequence", "num_labels": 3, "classifier_pooling": "mean"}),
    ("modernbert", {"classifier": "token", "num_labels": 3}),
    ("bert", {"nsp": False, "classifier": "span"}),
    ("roberta", {"classifier": "span"}),
    ("modernbert", {"classifier": "span"}),
    ("bert", {"nsp": False, "classifier": "choice"}),
    ("roberta", {"classifier": "choice"}),
    ("modernbert", {"classifier": "choice", "classifier_pooling": "mean"}),
]
TASK_NAMES = {"sequence": "SequenceClassification", "token": "TokenClassification"}
TASK_NAMES.update(span="QuestionAnswering", choice="MultipleChoice")


ROUND_TRIPS = [
    *[("bert", {}), ("bert", {"nsp": False}), ("roberta", {}), ("modernbert", {})],
    ("modernbert", {"window": 0}),  # every layer global: saved as such, loaded as window 0
    # a period longer than the model: layer 0 global alone, and global_every as it was
    ("modernbert", {"global_every": 7}),
    *CLASSIFIERS,
]


@pytest.mark.parametrize("preset,over", ROUND_TRIPS)
def test_save_round_trip(preset, over, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers loads the save")
    if over.get("window") == 0:
        skip_unless_all_global_modernbert_builds(transformers)
    model = perturb(TinyEncoder(tiny(preset, **over))).eval()
    tinyencoder_hf.save(model, str(tmp_path))
    auto = transformers.AutoModelForMaskedLM
    if model.cfg.classifier != "none":
        auto = getattr(transformers, "AutoModelFor" + TASK_NAMES[model.cfg.classifier])
    if model.cfg.nsp:
        auto = transformers.AutoModelForPreTraining
    hf = auto.from_pretrained(str(tmp_path)).eval()
    name = type(hf).__name__
    assert name == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    ids, mask, kw = hf_inputs(name)
    if model.cfg.type_vocab == 1:  # RoBERTa: one segment
        kw.pop("token_type_ids", None)
    with torch.no_grad():
        out, ref = model(ids, **kw), hf(input_ids=ids, **kw)
    keep = mask.bool()
    if model.cfg.classifier in ("sequence", "choice"):
        keep = slice(None)  # one row of logits per sequence, one logit per choice
    assert_close(out.logits[keep], hf_logits(ref, name)[keep], 1e-5)
    if model.cfg.nsp:
        assert_close(out.nsp_logits, ref.seq_relationship_logits, 1e-5)
    again = tinyencoder_hf.load(str(tmp_path))
    assert not again.training  # as from_pretrained's models: dropout off
    assert again.cfg == model.cfg
    with torch.no_grad():
        back = again(ids, **kw)
    assert torch.equal(back.logits, out.logits)


@pytest.mark.parametrize(
    "architectures, shown",
    [
        (["GPT2LMHeadModel"], "'GPT2LMHeadModel'"),
        ("GPT2LMHeadModel", "'GPT2LMHeadModel'"),
        (5, "5"),
        ([["BertForMaskedLM"]], r"\['BertForMaskedLM'\]"),
    ],
)
def test_load_rejects_unsupported_architecture(tmp_path, architectures, shown):
    """A class in a list, as transformers writes it, or alone, as a hand-written config may;
    anything else that a hand-written config holds is refused as such, by name."""
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": architectures, "model_type": "gpt2"})
    )
    with pytest.raises(
        ValueError, match=rf"architecture {shown} is not supported.*BertForMaskedLM.*ModernBert"
    ):
        tinyencoder_hf.load(str(tmp_path))


def test_pretraining_weights_under_a_classifier_class_are_named_as_such(tmp_path):
    """BERT's pretraining weights (with the NSP head) in a folder whose config names a classifier:
    refused as weights that do not match the class, not as a Config that cannot be."""
    transformers = pytest.importorskip("transformers", reason="the checkpoint is transformers'")
    sizes = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    config = transformers.BertConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD, **sizes)
    transformers.BertForPreTraining(config).save_pretrained(str(tmp_path))
    edit_config(tmp_path, architectures=["BertForSequenceClassification"])
    with pytest.raises(ValueError, match=r"do not match BertForSequenceClassification: missing"):
        tinyencoder_hf.load(str(tmp_path))


def test_save_onto_a_file_is_one_value_error(tmp_path):
    pytest.importorskip("safetensors.torch", reason="save checks for safetensors first")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match="taken is a file, not a folder"):
        tinyencoder_hf.save(TinyEncoder(tiny("bert")), str(tmp_path / "taken"))


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_names_missing_and_unexpected_weights(change, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny("bert", nsp=False)), str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    sd = st.load_file(path)
    key = "bert.encoder.layer.1.output.dense.weight"
    if change == "missing":
        del sd[key]
    else:
        key = "bert.encoder.layer.0.attention.self.rotary.weight"
        sd[key] = torch.zeros(3)
    st.save_file(sd, path)
    with pytest.raises(ValueError, match=rf"{change} \[.*'{key}'"):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "name,extras",
    [
        ("BertForMaskedLM", ("bert.pooler.dense", "cls.seq_relationship")),
        ("RobertaForMaskedLM", ("roberta.pooler.dense",)),
    ],
)
def test_load_ignores_pretraining_extras(name, extras, tmp_path):
    """Hub MLM checkpoints (bert-base-uncased, roberta-base) also carry pooler / NSP weights;
    transformers loads them with an 'UNEXPECTED, can be ignored' note, and so do we."""
    transformers = pytest.importorskip(
        "transformers", reason="the checkpoint is written by transformers"
    )
    st = pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    hf = hf_model(transformers, name, "eager")
    hf.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    sd = st.load_file(path)
    for key in extras:
        out = 2 if "seq_relationship" in key else 32
        sd[key + ".weight"], sd[key + ".bias"] = torch.randn(out, 32), torch.randn(out)
    st.save_file(sd, path)
    model = tinyencoder_hf.load(str(tmp_path)).eval()
    ids, mask = batch(lo=2, hi=VOCAB_SIZE, pad=hf.config.pad_token_id)
    with torch.no_grad():
        assert_close(
            model(ids, mask).logits[mask.bool()],
            hf(input_ids=ids, attention_mask=mask).logits[mask.bool()],
        )


# config.json as the hub's checkpoints write it (transformers 4's keys), at a small size
HUB_CONFIGS = {
    "BertForMaskedLM": dict(
        model_type="bert",
        attention_probs_dropout_prob=0.1,
        hidden_dropout_prob=0.1,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        max_position_embeddings=64,
        pad_token_id=0,
        position_embedding_type="absolute",
        type_vocab_size=2,
        gradient_checkpointing=False,
        use_cache=True,
        transformers_version="4.6.0.dev0",
    ),
    "RobertaForMaskedLM": dict(
        model_type="roberta",
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    ),
    "ModernBertForMaskedLM": dict(
        model_type="modernbert",
        num_hidden_layers=4,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        global_attn_every_n_layers=3,
        local_attention=8,
        hidden_activation="gelu",
        classifier_activation="gelu",
        norm_eps=1e-5,
        norm_bias=False,
        mlp_bias=False,
        attention_bias=False,
        classifier_bias=False,
        decoder_bias=True,
        max_position_embeddings=64,
        pad_token_id=PAD,
        cls_token_id=CLS,
        sep_token_id=SEP,
        transformers_version="4.47.0.dev0",
    ),
}


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_a_norm_eps_is_read_and_written_under_transformers_key(preset):
    """A norm epsilon other than the preset's survives save and load under the key transformers
    reads (ModernBERT's norm_eps, the others' layer_norm_eps). Parity cannot tell, 1e-5 from 1e-6
    moving the logits by less than its tolerance, nor a round trip, both of whose sides are ours."""
    transformers = pytest.importorskip("transformers", reason="transformers reads the config")
    hf = tinyencoder_hf.config_to_hf(Config.from_preset(preset, norm_eps=3e-7))
    config = transformers.AutoConfig.for_model(**hf)
    key = dict(bert="layer_norm_eps", roberta="layer_norm_eps", modernbert="norm_eps")[preset]
    assert getattr(config, key) == 3e-7
    assert tinyencoder_hf.config_from_hf(config.to_dict()).norm_eps == 3e-7


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_style_configs_load_exactly(name, tmp_path):
    """The keys of bert-base-uncased's, roberta-base's and ModernBERT-base's config.json
    (ModernBERT's global_rope_theta, local_rope_theta, global_attn_every_n_layers) read as
    transformers reads them."""
    transformers = pytest.importorskip("transformers", reason="transformers reads the config")
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    hub = {**sizes, **HUB_CONFIGS[name], "architectures": [name], "vocab_size": VOCAB_SIZE}
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(hub))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hub")
    hf = perturb(transformers.AutoModelForMaskedLM.from_config(config)).eval()
    hf.save_pretrained(tmp_path / "weights")
    shutil.copy(tmp_path / "weights" / "model.safetensors", tmp_path / "hub")
    loaded = tinyencoder_hf.load(str(tmp_path / "hub")).eval()
    ids, mask = batch(lo=3, hi=PAD, pad=hub["pad_token_id"])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        for unpad in (False, True):
            out = variant(loaded, unpad=unpad)(ids, mask).logits
            assert_close(out[mask.bool()], ref[mask.bool()])


# Checkpoints whose logits ours would not reproduce, and what the error says
REFUSED = [
    ("BertForMaskedLM", dict(tie_word_embeddings=False), "an untied decoder"),
    ("RobertaForMaskedLM", dict(tie_word_embeddings=False), "an untied decoder"),
    ("ModernBertForMaskedLM", dict(tie_word_embeddings=False), "an untied decoder"),
    ("BertForMaskedLM", dict(is_decoder=True), "is_decoder and add_cross_attention"),
    ("RobertaForMaskedLM", dict(hidden_act="gelu_pytorch_tanh"), "applies 'gelu'"),
    (
        "ModernBertForMaskedLM",
        dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0}}),
        r"RoPE scaling \('linear'\)",
    ),
    ("ModernBertForMaskedLM", dict(decoder_bias=False), "decoder_bias must be true"),
    # transformers' sparse prediction leaves the tokens labelled 5 out of its loss
    (
        "ModernBertForMaskedLM",
        dict(sparse_prediction=True, sparse_pred_ignore_index=5),
        "sparse_pred_ignore_index 5 is not supported; only -100",
    ),
    (
        "ModernBertForMaskedLM",
        dict(classifier_activation="silu"),
        "classifier_activation 'silu'",
    ),
    ("BertForMaskedLM", dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    # transformers' RoBERTa cannot number its positions without a pad id
    ("RobertaForMaskedLM", dict(pad_token_id=None), "pad_token_id null: RoBERTa numbers"),
    # transformers' local layers then see each token alone, which no window of ours does
    ("ModernBertForMaskedLM", dict(local_attention=0), "local_attention 0 .* not supported"),
    ("ModernBertForMaskedLM", dict(local_attention=1), "local_attention 1 .* not supported"),
    (
        "BertForSequenceClassification",
        dict(problem_type="multi_label_classification"),
        "problem_type 'multi_label_classification' with num_labels=3 is not supported",
    ),
    (
        "ModernBertForSequenceClassification",
        dict(problem_type="regression"),
        "computes 'single_label_classification'",
    ),
]


@pytest.mark.parametrize("name,over,message", REFUSED)
def test_load_refuses_what_it_would_compute_differently(name, over, message, tmp_path):
    """Checkpoints whose logits ours would not reproduce: a clear error, not a silent misload."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf_model(transformers, name, "eager", **over).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "over, window",
    [
        # local_attention 9: transformers' local layers see 4 keys each side, as a window of 8 does
        (dict(local_attention=9), 8),
        # every layer global: transformers never reads local_attention (0 here), nor we: window 0
        (dict(local_attention=0, global_attn_every_n_layers=1), 0),
    ],
)
def test_local_attention_loads_as_the_window_transformers_attends_in(over, window, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    if window == 0:
        skip_unless_all_global_modernbert_builds(transformers)
    name = "ModernBertForMaskedLM"
    hf = hf_model(transformers, name, "eager", **over).eval()
    hf.save_pretrained(tmp_path)
    ids, mask, kw = hf_inputs(name)
    model = tinyencoder_hf.load(str(tmp_path)).eval()
    assert model.cfg.window == window
    with torch.no_grad():
        out, ref = model(ids, **kw).logits, hf(input_ids=ids, **kw).logits
    assert_close(out[mask.bool()], ref[mask.bool()], 1e-4)


@pytest.mark.parametrize("local_attention", [0, 128])
def test_a_hub_style_all_global_config_loads_with_no_window(local_attention, tmp_path):
    """A config.json with no layer_types (the hub's, written by transformers 4) and
    global_attn_every_n_layers 1: every layer global, whatever local_attention says, as with
    layer_types. local_attention 0 was refused, and 128 loaded as a window no layer used."""
    transformers = pytest.importorskip("transformers", reason="transformers reads the checkpoint")
    skip_unless_all_global_modernbert_builds(transformers)
    name = "ModernBertForMaskedLM"
    hf_model(transformers, name, "eager", global_attn_every_n_layers=1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    config["local_attention"] = local_attention
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager")
    model = tinyencoder_hf.load(str(tmp_path))
    assert set(hf.config.layer_types) == {"full_attention"} and model.cfg.window == 0
    ids, mask, kw = hf_inputs(name)
    with torch.no_grad():
        out, ref = model.eval()(ids, **kw).logits, hf.eval()(input_ids=ids, **kw).logits
    assert_close(out[mask.bool()], ref[mask.bool()], 1e-4)


def test_a_sliding_window_key_sets_the_window_as_in_transformers(tmp_path):
    """ModernBertConfig takes sliding_window as an alias (local_attention = 2 * it), obeyed over
    local_attention wherever it stands in config.json: so is it here."""
    transformers = pytest.importorskip("transformers", reason="transformers reads the checkpoint")
    name = "ModernBertForMaskedLM"
    hf_model(transformers, name, "eager").save_pretrained(tmp_path)  # local_attention 8
    edit_config(tmp_path, sliding_window=2)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager")
    model = tinyencoder_hf.load(str(tmp_path))
    assert hf.config.local_attention == 4
    assert model.cfg.window == 4
    ids, mask, kw = hf_inputs(name)
    with torch.no_grad():
        out, ref = model(ids, **kw).logits, hf.eval()(input_ids=ids, **kw).logits
    assert_close(out[mask.bool()], ref[mask.bool()], 1e-4)


def test_rope_parameters_not_keyed_by_layer_kind_are_refused(tmp_path):
    """transformers refuses a flat rope_parameters; read as ours, its theta went unread."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf_model(transformers, "ModernBertForMaskedLM", "eager").save_pretrained(tmp_path)
    edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    with pytest.raises(ValueError, match="rope_parameters must be keyed by 'full_attention'"):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "edit, message",
    [
        # older configs name rope_type "type", and transformers scales by it (logits 4.4 apart)
        ({"type": "linear", "factor": 4.0, "rope_theta": 160000.0}, r"RoPE scaling \('linear'\)"),
        (None, "RoPE parameters must be an object, got None"),  # was an AttributeError
        ("rope_scaling default", None),  # the older key, naming no scaling: plain RoPE
        # its theta is both kinds' in transformers (ours went unread: logits 4.9 apart)
        ("rope_scaling theta", None),
    ],
)
def test_rope_parameters_load_as_transformers_reads_them(edit, message, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf = hf_model(transformers, "ModernBertForMaskedLM", "eager")
    hf.save_pretrained(tmp_path)
    if edit == "rope_scaling default":
        edit_config(tmp_path, rope_scaling={"rope_type": "default"})
    elif edit == "rope_scaling theta":
        edit_config(tmp_path, rope_scaling={"rope_type": "default", "rope_theta": 500.0})
    else:
        thetas = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
        edit_config(tmp_path, rope_parameters={**thetas, "full_attention": edit})
    if message:
        with pytest.raises(ValueError, match=message):
            tinyencoder_hf.load(str(tmp_path))
        return
    ids, mask, kw = hf_inputs("ModernBertForMaskedLM", hf.config.pad_token_id)
    with torch.no_grad():
        ref = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)(ids, **kw).logits
        out = tinyencoder_hf.load(str(tmp_path))(ids, **kw).logits
    assert_close(out[mask.bool()], ref[mask.bool()], 1e-4)


@pytest.mark.parametrize(
    "preset, key, value, what",
    [
        # a hand-written file's values of another JSON type: TypeErrors from inside load
        ("bert", "vocab_size", "320", "a whole number"),
        ("bert", "max_position_embeddings", 512.5, "a whole number"),
        ("roberta", "id2label", 3, "an object"),
        ("modernbert", "layer_types", 3, "a list"),
        ("modernbert", "model_type", ["modernbert"], "a string"),
        ("modernbert", "sliding_window", "4", "a whole number"),
    ],
)
def test_config_values_of_another_type_are_named(preset, key, value, what, tmp_path):
    pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny(preset)), str(tmp_path))
    edit_config(tmp_path, **{key: value})
    message = f"config.json: {key} must be {what}, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize("period", [0, "2"])
def test_a_period_that_is_no_count_beside_layer_types_loads_by_them(period, tmp_path):
    """global_attn_every_n_layers 0 or "2", which transformers loads by its layer_types: so do we
    (a ZeroDivisionError and a TypeError from inside load, for a time)."""
    pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny("modernbert")), str(tmp_path))
    edit_config(tmp_path, global_attn_every_n_layers=period)
    assert tinyencoder_hf.load(str(tmp_path)).cfg == tiny("modernbert")


def test_a_null_pad_id_in_a_vocabulary_too_small_for_pad_pads_with_0():
    """No padding row, and a vocabulary of 200 ids: PAD (256) is not among them, nor
    ModernBERT's default 50283; ours pads with 0."""
    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=200)
    hf = dict(sizes, model_type="modernbert", pad_token_id=None)
    assert tinyencoder_hf.config_from_hf(hf).pad_id == 0


def test_layer_types_of_another_length_are_named(tmp_path):
    """num_hidden_layers null (transformers' default, 22) beside layer_types of 3: the count is
    named, not "not 'global every n-th layer'"."""
    pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny("modernbert")), str(tmp_path))
    edit_config(tmp_path, num_hidden_layers=None)
    with pytest.raises(ValueError, match="layer_types has 3 entries for num_hidden_layers=22"):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "key, value",
    [
        # one of q, k, v as a vector, a norm's weight as a scalar: torch.cat failed on them
        ("bert.encoder.layer.0.attention.self.key.weight", torch.zeros(32)),
        ("bert.embeddings.LayerNorm.weight", torch.tensor(1.0)),
        ("bert.encoder.layer.1.attention.self.value.weight", torch.zeros(32, 16)),
    ],
)
def test_a_weight_of_the_wrong_shape_is_named(key, value, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny("bert")), str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    sd = st.load_file(path)
    expected = tuple(sd[key].shape)
    st.save_file({**sd, key: value}, path)
    message = f"{key} has shape {tuple(value.shape)}, expected {expected}"
    with pytest.raises(ValueError, match=re.escape(message)):
        tinyencoder_hf.load(str(tmp_path))


def test_an_nsp_head_in_another_family_is_named_unexpected(tmp_path):
    """cls.seq_relationship, BERT's NSP head, in a RoBERTa checkpoint: a weight that does not
    match the class, named as such (it built a RoBERTa with an NSP head: KeyError 'pooler')."""
    st = pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny("roberta")), str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    sd = st.load_file(path)
    sd["cls.seq_relationship.weight"], sd["cls.seq_relationship.bias"] = (
        torch.randn(2, 32),
        torch.randn(2),
    )
    st.save_file(sd, path)
    with pytest.raises(ValueError, match=r"unexpected \['cls.seq_relationship"):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize(
    "over",
    [
        dict(decoder_bias=False),
        dict(classifier_activation="gelu_pytorch_tanh"),
        dict(classifier_activation="silu"),
    ],
)
def test_a_base_model_loads_whatever_its_heads_keys(over, tmp_path):
    """A ModernBertModel holds no head: the keys of the heads it lacks do not stop it loading."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf = hf_model(transformers, "ModernBertModel", "eager", **over)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds a base model"):
        model = tinyencoder_hf.load(str(tmp_path))
    ids, mask, kw = hf_inputs("ModernBertModel")
    with torch.no_grad():
        out, ref = model(ids, **kw).hidden, hf(input_ids=ids, **kw).last_hidden_state
    assert_close(out[mask.bool()], ref[mask.bool()], 1e-4)


def test_a_roberta_multiple_choice_head_drops_as_its_class_does(tmp_path):
    """RobertaForMultipleChoice drops with hidden_dropout_prob whatever classifier_dropout says: so
    does the loaded model, and it saves again as loaded."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    name = "RobertaForMultipleChoice"
    dropouts = dict(classifier_dropout=0.3, hidden_dropout_prob=0.1)
    byte_level = dict(pad_token_id=PAD, max_position_embeddings=PAD + 1 + 64)  # saves as bytes
    hf = hf_model(transformers, name, "eager", **dropouts, **byte_level)
    hf.save_pretrained(tmp_path / "a")
    model = tinyencoder_hf.load(str(tmp_path / "a"))
    assert hf.dropout.p == pytest.approx(0.1)
    assert model.cfg.classifier_dropout == pytest.approx(0.1)
    tinyencoder_hf.save(model, str(tmp_path / "b"))
    assert tinyencoder_hf.load(str(tmp_path / "b")).cfg == model.cfg


def test_a_classifier_loads_whatever_its_unused_decoder_bias(tmp_path):
    """decoder_bias is the MLM decoder's: a ModernBERT classifier without it loads exactly."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    name = "ModernBertForSequenceClassification"
    hf = hf_model(transformers, name, "eager", decoder_bias=False).eval()
    hf.save_pretrained(tmp_path)
    ids, mask, kw = hf_inputs(name)
    model = tinyencoder_hf.load(str(tmp_path)).eval()
    with torch.no_grad():
        assert_close(model(ids, **kw).logits, hf_logits(hf(input_ids=ids, **kw), name), 1e-4)


@pytest.mark.parametrize("family", ["Bert", "Roberta", "ModernBert"])
def test_config_keys_left_out_take_transformers_defaults(family):
    """A config.json may hold only what differs from its class's defaults (transformers writes
    them all, but hand-written ones exist): it reads as the class's full default config does."""
    transformers = pytest.importorskip(
        "transformers", reason="its config classes hold the defaults"
    )
    full = getattr(transformers, family + "Config")().to_dict()
    bare = tinyencoder_hf.config_from_hf({"model_type": full["model_type"]})
    # the [CLS] and [SEP] ids aside: no forward reads them, and a config without them keeps ours
    ids = dict(cls_id=bare.cls_id, sep_id=bare.sep_id)
    assert bare == dataclasses.replace(tinyencoder_hf.config_from_hf(full), **ids)
    # (a null pad_token_id says more: no padding row, test_a_null_pad_id_loads_with_no_padding_row)
    kept = ("model_type", "layer_types", "pad_token_id")
    with_nulls = {key: None for key in full if key not in kept}
    assert tinyencoder_hf.config_from_hf({**with_nulls, "model_type": full["model_type"]}) == bare
    # at another width too: intermediate_size is a fixed default, not a multiple of hidden_size
    narrow = {"model_type": full["model_type"], "hidden_size": 64, "num_attention_heads": 4}
    assert tinyencoder_hf.config_from_hf(narrow).intermediate == full["intermediate_size"]


@pytest.mark.parametrize(
    "name,over",
    [
        ("BertForSequenceClassification", dict(classifier_pooling="mean")),  # a key BERT ignores
        ("RobertaForSequenceClassification", dict(classifier_pooling="mean")),
        ("BertForMaskedLM", dict(eos_token_id=[2, 3])),  # BertConfig takes a list of ids
        ("RobertaForMaskedLM", dict(eos_token_id=[2, 3])),
        # sparse_pred_ignore_index says nothing without sparse prediction, nor to a classifier
        ("ModernBertForMaskedLM", dict(sparse_prediction=False, sparse_pred_ignore_index=5)),
        (
            "ModernBertForSequenceClassification",
            dict(sparse_prediction=True, sparse_pred_ignore_index=5),
        ),
    ],
)
def test_keys_transformers_ignores_or_takes_as_lists_load_exactly(name, over, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf = hf_model(transformers, name, "eager", **over)
    hf.save_pretrained(tmp_path)
    ids, mask, kw = hf_inputs(name, hf.config.pad_token_id)
    with torch.no_grad():
        ref = hf_logits(hf(input_ids=ids, **kw), name)
        out = tinyencoder_hf.load(str(tmp_path))(ids, **kw).logits
    if out.dim() == 3:  # per token: the real ones
        out, ref = out[mask.bool()], ref[mask.bool()]
    assert_close(out, ref, 1e-4)


@pytest.mark.parametrize(
    "name, names",
    [
        ("BertForSequenceClassification", {0: "negative", 1: "neutral", 2: "positive"}),
        # finetune.py's QA exports name them: a second save wrote LABEL_0 and LABEL_1
        ("BertForQuestionAnswering", {0: "start", 1: "end"}),
    ],
)
def test_load_then_save_keeps_the_class_names(name, names, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf_model(transformers, name, "eager", id2label=names).save_pretrained(tmp_path / "a")
    tinyencoder_hf.save(tinyencoder_hf.load(str(tmp_path / "a")), str(tmp_path / "b"))
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["id2label"] == {str(i): label for i, label in names.items()}


def test_a_base_model_loads_with_a_warning_that_its_head_starts_fresh(tmp_path):
    """As transformers' BertForMaskedLM.from_pretrained of a BertModel: the head is new."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf_model(transformers, "BertModel", "eager").save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds a base model: the MLM head starts fresh"):
        tinyencoder_hf.load(str(tmp_path))


def test_a_sharded_checkpoint_loads(tmp_path):
    """save_pretrained splits a model above max_shard_size into files listed by an index."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    name = "ModernBertForMaskedLM"
    hf = hf_model(transformers, name, "eager")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask, kw = hf_inputs(name)
    with torch.no_grad():
        ref, out = hf(input_ids=ids, **kw).logits, tinyencoder_hf.load(str(tmp_path))(ids, **kw)
    assert_close(out.logits[mask.bool()], ref[mask.bool()], 1e-4)


def test_a_pad_id_outside_the_vocabulary_is_named(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf_model(transformers, "ModernBertForMaskedLM", "eager").save_pretrained(tmp_path)
    edit_config(tmp_path, pad_token_id=500)
    with pytest.raises(ValueError, match="pad_token_id 500 is outside the vocabulary of 320"):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize("name", ["BertForMaskedLM", "ModernBertForMaskedLM"])
def test_a_null_pad_id_loads_with_no_padding_row(name, tmp_path):
    """pad_token_id null: transformers' token embedding has no padding row, so that every row,
    the default pad id's too (BERT's 0; ModernBERT's 50283 lies outside the vocabulary, and ours
    pads with PAD), gets its gradient. The same loss and the same gradient, row by row."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    hf = hf_model(transformers, name, "eager", pad_token_id=None)
    hf.save_pretrained(tmp_path)
    model = tinyencoder_hf.load(str(tmp_path))
    assert model.cfg.pad_id == {"BertForMaskedLM": 0, "ModernBertForMaskedLM": PAD}[name]
    ids = torch.tensor([[CLS, 0, 65, PAD, 66, 0, PAD, SEP]])
    labels = torch.full_like(ids, -100)
    labels[0, 2:6] = torch.tensor([0, PAD, 70, 0])
    hf(input_ids=ids, labels=labels).loss.backward()
    out = model(ids, labels=labels)
    out.loss.backward()
    assert_close(out.loss, hf(input_ids=ids, labels=labels).loss, 1e-5)
    embeddings = hf.base_model.embeddings
    theirs = {"BertForMaskedLM": "word_embeddings", "ModernBertForMaskedLM": "tok_embeddings"}
    theirs = getattr(embeddings, theirs[name])
    assert theirs.weight.grad[[0, PAD]].abs().amax(1).min() > 0
    assert_close(model.tok_embed.weight.grad, theirs.weight.grad, 1e-5)


@pytest.mark.parametrize(
    "preset,over,message",
    [
        ("bert", dict(prenorm=True), "no transformers equivalent; offending: {'prenorm': True}"),
        ("roberta", dict(act="gelu_tanh"), "transformers' applies 'gelu'"),
        ("roberta", dict(pad_id=1, pos_offset=2), "a byte-level RoBERTa with pad_id=1, a byte"),
        ("roberta", dict(nsp=True), "next-sentence head for BERT only, not roberta"),
        ("modernbert", dict(nsp=True), "next-sentence head for BERT only, not modernbert"),
        # RobertaForMultipleChoice drops with hidden_dropout_prob, whatever classifier_dropout says
        (
            "roberta",
            dict(classifier="choice", classifier_dropout=0.3),
            "{'classifier_dropout': 0.3}",
        ),
    ],
)
def test_save_refuses_what_transformers_would_compute_differently(preset, over, message, tmp_path):
    pytest.importorskip("safetensors.torch", reason="save checks for safetensors first")
    with pytest.raises(ValueError, match=re.escape(message)):
        tinyencoder_hf.save(TinyEncoder(tiny(preset, **over)), str(tmp_path))
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    "family, over",
    [
        ("ModernBert", dict(vocab_size=1000, pad_token_id=0)),  # [CLS] 50281 by default
        ("Bert", dict(vocab_size=259)),  # [MASK] 259 by default
        (
            "Roberta",
            dict(vocab_size=200, bos_token_id=0, eos_token_id=2, max_position_embeddings=66),
        ),
    ],
)
def test_special_ids_that_no_forward_reads_may_lie_outside_the_vocabulary(family, over, tmp_path):
    """transformers builds and runs these; they load with its logits, their ids inside the table."""
    transformers = pytest.importorskip("transformers", reason="the checkpoint is transformers'")
    sizes = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48)
    config = getattr(transformers, family + "Config")(**sizes, **over)
    hf = getattr(transformers, family + "ForMaskedLM")(config).eval()
    hf.save_pretrained(tmp_path)
    model = tinyencoder_hf.load(str(tmp_path)).eval()
    ids = torch.randint(3, 150, (2, 12))
    with torch.no_grad():
        assert_close(model(ids).logits, hf(input_ids=ids).logits, 1e-4)
    cfg = model.cfg
    assert max(cfg.cls_id, cfg.sep_id, cfg.mask_id) < config.vocab_size


def test_save_writes_numpy_numbers_as_json_numbers(tmp_path):
    """Config takes numpy's integers and floats; config.json gets plain numbers, and the folder
    loads back to the same Config."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    cfg = tiny("bert", hidden=np.int64(32), init_std=np.float32(0.5), attn_dropout=np.float64(0))
    tinyencoder_hf.save(TinyEncoder(cfg), str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 32
    assert tinyencoder_hf.load(str(tmp_path)).cfg == cfg


@pytest.mark.parametrize(
    "file,content,message",
    [
        ("config.json", "[1, 2]", "config.json: not a JSON object, but a list"),
        ("config.json", "{not json", "config.json: not a readable JSON file"),
        ("model.safetensors", "not weights", "its weights are not readable"),
    ],
)
def test_load_names_an_unreadable_file(file, content, message, tmp_path):
    pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    tinyencoder_hf.save(TinyEncoder(tiny("roberta")), str(tmp_path))
    (tmp_path / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        tinyencoder_hf.load(str(tmp_path))


def test_load_reads_tf_era_layernorm_names(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="checkpoints are safetensors files")
    model = perturb(TinyEncoder(tiny("bert", nsp=False))).eval()
    tinyencoder_hf.save(model, str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    old = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in st.load_file(path).items()
    }
    # the embeddings', two per layer, the MLM head's
    assert sum(k.endswith(".gamma") for k in old) == 1 + 2 * 2 + 1
    st.save_file(old, path)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(
            tinyencoder_hf.load(str(tmp_path)).eval()(ids, mask).logits,
            model(ids, mask).logits,
        )


def test_a_lone_copy_trains_embeds_and_classifies(tmp_path):
    """Copied alone into another project, tinyencoder.py needs torch only: it trains (masked-LM
    steps lower the loss), embeds and classifies; transformers' checkpoints need tinyencoder_hf."""
    shutil.copy(Path(__file__).parent / "tinyencoder.py", tmp_path)
    # an editable install puts tinyencoder_hf on the path anywhere: hide it, as a lone copy lacks it
    code = (
        "import sys; sys.modules['tinyencoder_hf'] = None; import tinyencoder as te; "
        "c = te.Config.from_preset('bert', hidden=32, layers=1, heads=2, nsp=False, "
        "classifier='sequence', num_labels=3); m = te.TinyEncoder(c).eval(); "
        "ids = te.torch.tensor([[1, 2]]); mask = te.torch.ones_like(ids); "
        "print(tuple(te.pool(m(ids).hidden, mask, 'mean').shape), tuple(m(ids).logits.shape)); "
        "te.torch.manual_seed(0); g = te.TinyEncoder(te.Config.from_preset('modernbert', "
        "hidden=32, layers=1, heads=2)); opt = te.torch.optim.AdamW(g.parameters(), lr=1e-2); "
        "x, y = te.mask_tokens(te.torch.randint(0, 256, (2, 16)), g.cfg, rate=0.5); losses = []\n"
        "for _ in range(5):\n"
        "    loss = g(x, labels=y).loss; loss.backward(); opt.step(); opt.zero_grad()\n"
        "    losses.append(loss.item())\n"
        "print(losses[-1] < losses[0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["(1,", "32)", "(1,", "3)", "True"]


# -------------------------------------------------------------------------------------------------
# Exported models take raw text: transformers' tokenizer and pipeline, sentence-transformers
MIXED_TEXT = "def f(x):\n\treturn x  # héllo, wörld ✓ 日本 \x00\x7f"


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_saved_tokenizer_frames_text_as_tinyencoder(preset, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the tokenizer is transformers'")
    tinyencoder_hf.save(TinyEncoder(tiny(preset)), str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    encoded = tokenizer(MIXED_TEXT)
    assert encoded["input_ids"] == [CLS, *byte_ids(MIXED_TEXT), SEP]
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == MIXED_TEXT
    assert tokenizer.mask_token_id == MASK and tokenizer.pad_token_id == PAD
    assert len(tokenizer) == VOCAB_SIZE  # every id the model can predict decodes
    pair = tokenizer("ab", "cé")
    assert pair["input_ids"] == [CLS, *byte_ids("ab"), SEP, *byte_ids("cé"), SEP]
    if preset == "bert":  # segments: A with its [SEP] is type 0, B with its [SEP] type 1
        assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
    else:
        assert "token_type_ids" not in pair


@pytest.mark.parametrize(
    "over", [dict(mask_id=300), dict(pad_id=300), dict(cls_id=280, sep_id=290)]
)
def test_saved_tokenizer_keeps_special_ids_past_a_gap(over, tmp_path):
    """Special ids with unused ids before them: the tokenizers library renumbers added tokens that
    leave a gap, so every id past the bytes has a token in the saved vocabulary."""
    transformers = pytest.importorskip("transformers", reason="the tokenizer is transformers'")
    cfg = tiny("modernbert", **over)
    tinyencoder_hf.save(TinyEncoder(cfg), str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer("ab")["input_ids"] == [cfg.cls_id, *byte_ids("ab"), cfg.sep_id]
    assert (tokenizer.mask_token_id, tokenizer.pad_token_id) == (cfg.mask_id, cfg.pad_id)
    assert tokenizer("[MASK]", add_special_tokens=False)["input_ids"] == [cfg.mask_id]
    # as README says: asked to, it reads the name as its bytes, as pipelines does
    as_bytes = tokenizer("[MASK]", add_special_tokens=False, split_special_tokens=True)
    assert as_bytes["input_ids"] == byte_ids("[MASK]")
    assert len(tokenizer) == VOCAB_SIZE
    assert tinyencoder_hf.load(str(tmp_path)).cfg == cfg  # mask_id too, which config.json keeps


def test_save_writes_a_tokenizer_for_the_byte_vocabulary_only(tmp_path):
    """A wordpiece-sized BERT (its [PAD] id 0, a byte) keeps its own tokenizer: none is written,
    and a warning says to copy it."""
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    wordpiece = dict(vocab_size=1000, pad_id=0, cls_id=101, sep_id=102, mask_id=103)
    with pytest.warns(UserWarning, match="holds no tokenizer: the vocabulary is not the byte one"):
        tinyencoder_hf.save(TinyEncoder(tiny("bert", **wordpiece)), str(tmp_path / "wordpiece"))
    tinyencoder_hf.save(TinyEncoder(tiny("bert")), str(tmp_path / "bytes"))
    assert sorted(p.name for p in (tmp_path / "wordpiece").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert (tmp_path / "bytes" / "tokenizer.json").exists()
    assert (tmp_path / "bytes" / "modules.json").exists()
    assert tinyencoder_hf.load(str(tmp_path / "wordpiece")).cfg.mask_id == 103
    # saved over the byte-level save: its tokenizer files stay, and the warning names them
    found = "it holds ['tokenizer.json', 'tokenizer_config.json', 'modules.json', "
    found = re.escape(found + "'sentence_bert_config.json', '1_Pooling/config.json']")
    with pytest.warns(UserWarning, match=found):
        tinyencoder_hf.save(TinyEncoder(tiny("bert", **wordpiece)), str(tmp_path / "bytes"))


def test_a_compiled_model_saves_as_the_model_it_wraps(tmp_path):
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    model = perturb(TinyEncoder(tiny("bert", nsp=False)))
    tinyencoder_hf.save(torch.compile(model), str(tmp_path))  # compiles nothing until called
    loaded = tinyencoder_hf.load(str(tmp_path)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="save takes a TinyEncoder, got Linear"):
        tinyencoder_hf.save(torch.nn.Linear(2, 2), str(tmp_path / "other"))


def test_save_takes_label_names_as_a_list_or_as_id2label(tmp_path):
    """transformers' id2label dict names the classes as a list does; the loss it will compute is
    written (problem_type), so that float labels do not turn it into multi-label's."""
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    model = TinyEncoder(tiny("bert", nsp=False, classifier="sequence", num_labels=2))
    tinyencoder_hf.save(model, str(tmp_path / "a"), labels={"1": "pos", 0: "neg"})
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written["id2label"] == {"0": "neg", "1": "pos"}
    assert written["problem_type"] == "single_label_classification"
    # np.unique's classes (numpy ints): JSON keys in label2id, which json.dumps refused
    tinyencoder_hf.save(model, str(tmp_path / "n"), labels=list(np.unique([7, 3, 7])))
    written = json.loads((tmp_path / "n" / "config.json").read_text())
    assert written["id2label"] == {"0": 3, "1": 7} and written["label2id"] == {"3": 0, "7": 1}
    bad = [
        (2, "labels must be a list of class names or an id2label dict, got 2"),
        ([("a",), "b"], "labels: each name must be a string or a number, got ('a',)"),
        (["a", "a"], "labels must differ from each other"),
        ({0: "a", 2: "b"}, "an id2label dict needs the ids 0 to 1, got [0, 2]"),
        (["a"], "1 label names for num_labels=2"),
    ]
    for labels, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            tinyencoder_hf.save(model, str(tmp_path / "b"), labels=labels)
    assert not (tmp_path / "b").exists()
    regression = TinyEncoder(tiny("roberta", classifier="sequence", num_labels=1))
    tinyencoder_hf.save(regression, str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["problem_type"] == "regression"


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_fill_mask_pipeline_predicts_our_argmax(preset, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the pipeline is transformers'")
    model = perturb(TinyEncoder(tiny(preset, nsp=False))).eval()
    tinyencoder_hf.save(model, str(tmp_path))
    fill = transformers.pipeline("fill-mask", model=str(tmp_path), top_k=3)
    predictions = fill("x = [MASK] + 1")
    ids = torch.tensor([[CLS, *byte_ids("x = "), MASK, *byte_ids(" + 1"), SEP]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(byte_ids("x = ")) + 1]
    assert [p["token"] for p in predictions] == logits.topk(3).indices.tolist()


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_the_saved_model_goes_through_torch_export(preset, tmp_path):
    """torch.export (which ONNX's exporter runs on) traces the saved transformers model, and the
    exported program gives tinyencoder's logits on padded rows: a route to ONNX and other runtimes
    that needs no tinyencoder.py (test_tinyencoder.py exports TinyEncoder itself)."""
    transformers = pytest.importorskip("transformers", reason="the exported model is transformers'")
    model = perturb(TinyEncoder(tiny(preset, nsp=False))).eval()
    tinyencoder_hf.save(model, str(tmp_path))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch((24, 19, 11), lo=2, hi=VOCAB_SIZE)
    # non-strict, torch's default since 2.7: the strict default before it (torch 2.4's) cannot
    # trace transformers' forward wrapper, which reads func.__code__.co_varnames
    program = torch.export.export(hf, (), dict(input_ids=ids, attention_mask=mask), strict=False)
    with torch.no_grad():
        exported = program.module()(input_ids=ids, attention_mask=mask)
        ours = model(ids, mask).logits
    keep = mask.bool()
    assert_close(exported.logits[keep], ours[keep], 1e-5)


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_a_saved_span_model_answers_in_transformers(preset, tmp_path):
    """The saved folder answers as pipelines.answer does: its tokenizer frames question and
    context as question_row does, and AutoModelForQuestionAnswering's start and end logits give
    the same span of the context, through the question-answering pipeline where the installed
    transformers still has one (later 5.x releases removed it)."""
    transformers = pytest.importorskip("transformers", reason="the answer is transformers'")
    model = perturb(TinyEncoder(tiny(preset, nsp=False, classifier="span"))).eval()
    tinyencoder_hf.save(model, str(tmp_path))
    question, context = "default of timeout?", "def get(url, timeout=10):\n    return url"
    ours = pipelines.answer(model, question, context, max_length=8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path)).eval()
    encoded = tokenizer(question, context, return_tensors="pt", return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")[0].tolist()
    row = pipelines.question_row(model.cfg, question, context)
    assert encoded["input_ids"][0].tolist() == row.ids
    with torch.no_grad():
        out = hf(**encoded)
    logits = torch.stack([out.start_logits[0], out.end_logits[0]], dim=-1)
    allowed = torch.tensor([part == 1 for part in encoded.sequence_ids(0)])
    first, last = pipelines.best_span(logits, allowed, max_length=8)
    assert context[offsets[first][0] : offsets[last][1]] == ours and ours
    try:
        answerer = transformers.pipeline("question-answering", model=str(tmp_path))
    except (KeyError, ValueError):  # removed from this transformers
        return
    answered = answerer(question=question, context=context, max_answer_len=8)
    assert answered["answer"] == ours


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_encode_equals_transformers_and_sentence_transformers(preset, tmp_path):
    """pipelines.encode on a saved model: mean pooling equals sentence-transformers' (which the
    saved folder sets up) and cls pooling transformers' AutoModel at position 0, for texts of
    different lengths batched together; normalize gives the same vectors at unit length."""
    transformers = pytest.importorskip("transformers", reason="encode is compared to transformers")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    model = perturb(TinyEncoder(tiny(preset, nsp=False))).eval()
    tinyencoder_hf.save(model, str(tmp_path))
    texts = ["short", MIXED_TEXT, "x" * 62, "", "ab", "a longer line of text\n" * 2]
    ours = pipelines.encode(model, texts, pooling="mean", normalize=False, batch_size=2)
    theirs = st.SentenceTransformer(str(tmp_path), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    assert_close(ours, theirs.cpu(), 1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    hf = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        first = [hf(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, 0] for t in texts]
    assert_close(
        pipelines.encode(model, texts, pooling="cls", normalize=False), torch.stack(first), 1e-4
    )
    unit = pipelines.encode(model, texts, batch_size=4)
    assert_close(unit, torch.nn.functional.normalize(ours, dim=-1), 1e-5)
    assert_close(unit.norm(dim=-1), torch.ones(len(texts)), 1e-5)


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_classify_and_tag_equal_transformers_pipelines(preset, tmp_path):
    """pipelines.classify and pipelines.tag on a saved classifier give what transformers'
    text-classification pipeline and token-classification pipeline ("simple" grouping, "O" left
    out) give on the saved folder: the same labels, scores within 1e-4, the same spans; and a
    regression model's number as it is (the saved problem_type says so)."""
    transformers = pytest.importorskip("transformers", reason="compared to transformers' pipelines")
    texts = ["short", "def f(x): return x + 1", "a longer line of text, 42 times\n", "ab"]
    for num_labels, names in ((3, ["neg", "neutral", "pos"]), (1, None)):
        cfg = tiny(preset, nsp=False, classifier="sequence", num_labels=num_labels)
        model = perturb(TinyEncoder(cfg), scale=0.5).eval()
        tinyencoder_hf.save(model, str(tmp_path / str(num_labels)), labels=names)
        pipe = transformers.pipeline("text-classification", model=str(tmp_path / str(num_labels)))
        theirs = pipe(texts)
        # loaded, the model knows its class names (id2label)
        ours = pipelines.classify(tinyencoder_hf.load(str(tmp_path / str(num_labels))), texts, 3)
        assert [v["label"] for v in ours] == [v["label"] for v in theirs]
        assert [v["score"] for v in ours] == pytest.approx([v["score"] for v in theirs], abs=1e-4)
    tagger = perturb(TinyEncoder(tiny(preset, nsp=False, classifier="token", num_labels=3)))
    with torch.no_grad():
        # logits centred over a text's tokens: each tag wins somewhere, not one everywhere
        ids = torch.tensor([[CLS, *byte_ids(texts[2]), SEP]])
        tagger.classifier.out.bias -= tagger.eval()(ids).logits[0].mean(0)
    # plain tags, and the B-/I- scheme (a B- starts a new run of its kind)
    for names, kinds in ((["O", "digit", "word"], {"digit", "word"}), (["O", "B-X", "I-X"], {"X"})):
        folder = str(tmp_path / names[1])
        tinyencoder_hf.save(tagger, folder, labels=names)
        pipe = transformers.pipeline(
            "token-classification", model=folder, aggregation_strategy="simple"
        )
        spans = pipelines.tag(tinyencoder_hf.load(folder), texts, batch_size=3)
        for text, ours in zip(texts, spans):
            theirs = [[group["start"], group["end"], group["entity_group"]] for group in pipe(text)]
            assert ours == theirs, text
        # not every byte "O", nor one tag throughout
        assert {tag for text_spans in spans for _, _, tag in text_spans} == kinds
        assert sum(len(text_spans) for text_spans in spans) > len(texts)


LOSS_CASES = [
    ("BertForSequenceClassification", 3),
    ("RobertaForSequenceClassification", 1),  # regression: mean squared error
    ("ModernBertForSequenceClassification:mean", 3),
    ("BertForTokenClassification", 3),
    ("RobertaForTokenClassification", 3),
    ("ModernBertForTokenClassification", 3),
    *((f"{stem}ForQuestionAnswering", 2) for stem in ("Bert", "Roberta", "ModernBert")),
    *((f"{stem}ForMultipleChoice", 2) for stem in ("Bert", "Roberta", "ModernBert")),
]


@pytest.mark.parametrize("name,num_labels", LOSS_CASES)
def test_classifier_losses_match_transformers(name, num_labels, tmp_path):
    """The same loss for the same labels. A span's: rows without padding (transformers' softmax
    runs over padding too, ours does not), one end past the row (ignored by both)."""
    transformers = pytest.importorskip("transformers", reason="losses are compared to transformers")
    # one output (num_labels 1): transformers reads it as regression
    hf = hf_model(transformers, name, "eager", num_labels=num_labels)
    hf.save_pretrained(tmp_path)
    ids, mask, _ = hf_inputs(name, hf.config.pad_token_id)
    g = torch.Generator().manual_seed(0)
    theirs = {}  # transformers' label arguments: labels, or a span's two
    if "Token" in name:  # padding's tags set to -100, as a tokenizer's labels would be
        labels = torch.randint(0, num_labels, ids.shape, generator=g).masked_fill(mask == 0, -100)
    elif num_labels == 1:
        labels = torch.randn(ids.shape[0], generator=g)
    elif "QuestionAnswering" in name:
        ids, mask, _ = hf_inputs(name, hf.config.pad_token_id, lens=(24, 24, 24))
        labels = torch.tensor([[3, 7], [5, 5], [2, 30]])
        theirs = dict(start_positions=labels[:, 0], end_positions=labels[:, 1])
    else:
        labels = torch.randint(0, num_labels, (ids.shape[0],), generator=g)
    if not theirs:
        theirs = dict(labels=labels)
    model = tinyencoder_hf.load(str(tmp_path)).eval()
    for unpad in (False, True):
        with torch.no_grad():
            ours = variant(model, unpad=unpad)(ids, mask, labels=labels).loss
            reference = hf(input_ids=ids, attention_mask=mask, **theirs).loss
        assert abs(ours.item() - reference.item()) <= 1e-5, (unpad, ours.item(), reference.item())


def test_without_safetensors_export_and_finetune_init_say_so(tmp_path):
    """safetensors is an extra: without it, exporting a checkpoint and finetune.py --init of a
    transformers folder each stop with one line that says what to install, and export nothing."""
    pytest.importorskip("safetensors.torch", reason="the transformers folder is written with it")
    checkpoint = tiny_checkpoint(tmp_path / "c.pt")
    tinyencoder_hf.save(TinyEncoder(tiny("roberta")), str(tmp_path / "hf"))
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n' * 4)
    export = ["tinyencoder_hf.py", checkpoint, tmp_path / "out"]
    tune = ["finetune.py", "--init", tmp_path / "hf", "--train", train, "--val", train]
    tune += ["--out-dir", tmp_path / "tuned", "--max-steps", 1]
    for command in (export, tune):
        run = run_without("safetensors", *command)
        assert run.returncode != 0 and "pip install safetensors" in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoints_with_retired_config_fields_still_export(tmp_path):
    """A train.py checkpoint written before sparse_prediction, static_masking and mlm_rate were
    retired exports as it was."""
    pytest.importorskip("safetensors.torch", reason="the export writes model.safetensors")
    model = perturb(TinyEncoder(tiny("roberta"))).eval()
    retired = dict(sparse_prediction=True, static_masking=False, mlm_rate=0.15)
    saved = dict(dataclasses.asdict(model.cfg), **retired)
    torch.save(dict(model=model.state_dict(), cfg=saved), tmp_path / "ckpt.pt")
    command = [sys.executable, "tinyencoder_hf.py", str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")]
    done = run_python(command)
    assert done.returncode == 0, done.stderr
    ids, mask = batch()
    with torch.no_grad():
        exported = tinyencoder_hf.load(str(tmp_path / "hf")).eval()(ids, mask).logits
        assert_close(exported, model(ids, mask).logits)


def small_files_only():
    """In the child before it runs: files of at most 64 KiB, as on a disk that is nearly full
    (Python ignores SIGXFSZ, so a longer write fails with EFBIG, as a full disk's with ENOSPC)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


def test_export_to_a_full_disk_is_one_line_and_leaves_no_cut_file(tmp_path):
    """safetensors' write error is a SafetensorError, not an OSError: it was a traceback, with a
    model.safetensors cut short left behind in the folder made for it."""
    pytest.importorskip("resource", reason="a file size limit needs the resource module (Unix)")
    pytest.importorskip("safetensors.torch", reason="the export writes model.safetensors")
    checkpoint = tiny_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "hf"
    command = [sys.executable, "tinyencoder_hf.py", str(checkpoint), str(out)]
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        preexec_fn=small_files_only,
    )
    assert run.returncode == 1 and run.stderr.startswith(f"error: cannot write {out} ("), run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "file/inside"])
def test_export_to_a_path_that_cannot_be_a_folder_is_one_line(tmp_path, where):
    pytest.importorskip("safetensors.torch", reason="the export writes model.safetensors")
    checkpoint = tiny_checkpoint(tmp_path / "c.pt")
    (tmp_path / "file").write_text("not a folder")
    command = [sys.executable, "tinyencoder_hf.py", str(checkpoint), str(tmp_path / where)]
    run = run_python(command)
    assert run.returncode != 0 and f"{tmp_path / 'file'}" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr


# Each config field under transformers' own key, both ways, where presets never show it
SPECIAL_KEYS = {
    "bert": ("bos_token_id", "eos_token_id"),
    "roberta": ("bos_token_id", "eos_token_id"),
    "modernbert": ("cls_token_id", "sep_token_id"),
}


@pytest.mark.parametrize("preset", ["bert", "roberta", "modernbert"])
def test_special_ids_are_written_and_read_under_transformers_keys(preset):
    """[CLS], [SEP] and [MASK] other than the defaults survive config_to_hf -> config_from_hf,
    each under the key transformers' config of the family names it."""
    cfg = tiny(preset, nsp=False, cls_id=280, sep_id=290, mask_id=300)
    hf = tinyencoder_hf.config_to_hf(cfg)
    cls_key, sep_key = SPECIAL_KEYS[preset]
    assert (hf[cls_key], hf[sep_key], hf["mask_token_id"]) == (280, 290, 300)
    assert tinyencoder_hf.config_from_hf(hf) == cfg


DROPOUTS = [
    (
        "bert",
        dict(nsp=False, attn_dropout=0.2, resid_dropout=0.3, embed_dropout=0.3),
        dict(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.3),
    ),
    (
        "modernbert",
        dict(attn_dropout=0.2, resid_dropout=0.2, embed_dropout=0.3, mlp_dropout=0.4),
        dict(attention_dropout=0.2, embedding_dropout=0.3, mlp_dropout=0.4),
    ),
]


@pytest.mark.parametrize("preset, fields, keys", DROPOUTS)
def test_dropouts_are_written_and_read_under_transformers_keys(preset, fields, keys):
    """Each dropout that differs from the others lands under its own key and reads back (a BERT
    MLM's classifier_dropout is not written, and reads back as hidden_dropout_prob: unused)."""
    cfg = tiny(preset, **fields)
    hf = tinyencoder_hf.config_to_hf(cfg)
    assert {key: hf[key] for key in keys} == keys
    back = tinyencoder_hf.config_from_hf(hf)
    for name in ("attn_dropout", "resid_dropout", "embed_dropout", "mlp_dropout"):
        assert getattr(back, name) == getattr(cfg, name), name


def test_a_bert_classifier_without_classifier_dropout_drops_with_hidden_dropout():
    """BertForSequenceClassification falls back on hidden_dropout_prob (classifier_dropout null)."""
    hf = dict(model_type="bert", hidden_dropout_prob=0.3, classifier_dropout=None)
    assert tinyencoder_hf.config_from_hf(hf, classifier="sequence").classifier_dropout == 0.3


def test_a_modernbert_with_biases_round_trips(tmp_path):
    """attention/mlp, norm and head biases all on: saved, read back as the same Config; an
    mlp_bias that differs from attention_bias is refused."""
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    over = dict(bias=True, norm_bias=True, head_bias=True, classifier="sequence", num_labels=3)
    cfg = tiny("modernbert", **over)
    tinyencoder_hf.save(TinyEncoder(cfg), str(tmp_path))
    assert tinyencoder_hf.load(str(tmp_path)).cfg == cfg
    edit_config(tmp_path, mlp_bias=False)
    with pytest.raises(ValueError, match="attention_bias must equal mlp_bias"):
        tinyencoder_hf.load(str(tmp_path))


@pytest.mark.parametrize("preset", ["bert", "modernbert"])
def test_the_tanh_gelu_round_trips(preset):
    """act="gelu_tanh" is written (hidden_act / hidden_activation, and ModernBERT's
    classifier_activation) and read back; gelu_new reads as it too."""
    cfg = tiny(preset, nsp=False, act="gelu_tanh")
    assert tinyencoder_hf.config_from_hf(tinyencoder_hf.config_to_hf(cfg)) == cfg
    new = tinyencoder_hf.config_from_hf(dict(model_type="bert", hidden_act="gelu_new"))
    assert new.act == "gelu_tanh"


def test_load_gives_fp32_whatever_the_checkpoint_stores(tmp_path):
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    model = TinyEncoder(tiny("bert", nsp=False))
    tinyencoder_hf.save(model.to(torch.bfloat16), str(tmp_path))
    loaded = tinyencoder_hf.load(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.tok_embed.weight, model.tok_embed.weight.float())


@pytest.mark.parametrize(
    "hf, message",
    [
        (dict(add_cross_attention=True), "is_decoder and add_cross_attention"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    ],
)
def test_config_from_hf_refuses_what_bert_computes_differently(hf, message):
    with pytest.raises(ValueError, match=message):
        tinyencoder_hf.config_from_hf(dict(model_type="bert", **hf))


@pytest.mark.parametrize(
    "preset, field, value",
    [("bert", "window", 8), ("bert", "mlp_dropout", 0.1), ("bert", "type_vocab", 0)]
    + [("modernbert", "resid_dropout", 0.1)],
)
def test_config_to_hf_names_each_field_transformers_hard_codes(preset, field, value):
    with pytest.raises(ValueError, match=re.escape(f"offending: {{{field!r}: {value!r}}}")):
        tinyencoder_hf.config_to_hf(tiny(preset, nsp=False, **{field: value}))


def test_saved_tokenizer_and_sentence_transformers_know_the_special_tokens_and_length(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the tokenizer is transformers'")
    cfg = tiny("bert", nsp=False, max_len=48)
    tinyencoder_hf.save(TinyEncoder(cfg), str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    specials = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    assert specials + (tokenizer.mask_token_id,) == (CLS, SEP, PAD, MASK)
    assert tokenizer.model_max_length == 48
    st_config = json.loads((tmp_path / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == 48


def test_a_byte_sized_vocabulary_whose_pad_is_a_byte_gets_no_tokenizer(tmp_path):
    """vocab_size 320 but [PAD] id 0, a byte: not the byte vocabulary; no tokenizer is written."""
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    with pytest.warns(UserWarning, match="holds no tokenizer"):
        tinyencoder_hf.save(TinyEncoder(tiny("bert", nsp=False, pad_id=0)), str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()


def test_layer_types_beside_a_period_that_gives_another_pattern_load_by_the_types(tmp_path):
    """layer_types [G, L, L] beside a hand-edited period of 0: no later global layer, so the period
    is the layer count (3), which gives those types (period 1 would make every layer global)."""
    pytest.importorskip("safetensors.torch", reason="save writes model.safetensors")
    cfg = tiny("modernbert", global_every=7)
    tinyencoder_hf.save(TinyEncoder(cfg), str(tmp_path))
    edit_config(tmp_path, global_attn_every_n_layers=0)
    loaded = tinyencoder_hf.load(str(tmp_path)).cfg
    assert loaded.global_every == 3
    assert tinyencoder_hf.layer_types(loaded) == tinyencoder_hf.layer_types(cfg)
