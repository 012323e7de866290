"""Conversion between tinyencoder and transformers checkpoints, written as tables.

    model = tinyencoder_hf.load("path/to/ModernBERT-base")  # a transformers checkpoint directory
    tinyencoder_hf.save(model, "out/hf")  # what transformers' Auto classes load
    python tinyencoder_hf.py out/ckpt_best.pt out/hf  # the same for a train.py checkpoint

A transformers directory holds config.json and model.safetensors (or pytorch_model.bin). Reading
and writing .safetensors needs the safetensors package; transformers itself is not needed here.
"""

import contextlib
import json
import numbers
import os
import warnings

import torch

import tinyencoder as te

# The transformers classes that load, and their family. A directory without "architectures" is
# read as its family's base model.
CLASSES = {
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
    "BertModel": "bert",
    "RobertaForMaskedLM": "roberta",
    "RobertaModel": "roberta",
    "ModernBertForMaskedLM": "modernbert",
    "ModernBertModel": "modernbert",
}
# The fine-tuning classes: family -> its class name's stem, and Config.classifier -> the suffix.
STEMS = {"bert": "Bert", "roberta": "Roberta", "modernbert": "ModernBert"}
TASK_SUFFIXES = {
    "sequence": "ForSequenceClassification",
    "token": "ForTokenClassification",
    "span": "ForQuestionAnswering",
    "choice": "ForMultipleChoice",
}
for family, stem in STEMS.items():
    for suffix in TASK_SUFFIXES.values():
        CLASSES[stem + suffix] = family
BASE_CLASSES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "modernbert": "ModernBertModel",
}

# Our activation name -> transformers' names for it: the first is written, all are read.
ACTIVATIONS = {
    "gelu": ("gelu",),
    "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new"),
}

# -------------------------------------------------------------------------------------------------
# Config: our field -> transformers' key, for the fields that carry over as they are.
COMMON_KEYS = {
    "vocab_size": "vocab_size",
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
    "pad_id": "pad_token_id",
    # not a key of transformers' configs, which keep it as they read it: so that a reload has it
    "mask_id": "mask_token_id",
    "init_std": "initializer_range",
}
BERT_KEYS = {
    **COMMON_KEYS,
    "type_vocab": "type_vocab_size",
    "norm_eps": "layer_norm_eps",
    "cls_id": "bos_token_id",
    "sep_id": "eos_token_id",
    "resid_dropout": "hidden_dropout_prob",
    "attn_dropout": "attention_probs_dropout_prob",
}
MODERNBERT_KEYS = {
    **COMMON_KEYS,
    "max_len": "max_position_embeddings",
    "norm_eps": "norm_eps",
    "bias": "attention_bias",
    "norm_bias": "norm_bias",
    "head_bias": "classifier_bias",
    "window": "local_attention",
    "global_every": "global_attn_every_n_layers",
    "rope_theta": "global_rope_theta",
    "rope_theta_local": "local_rope_theta",
    "embed_dropout": "embedding_dropout",
    "attn_dropout": "attention_dropout",
    "mlp_dropout": "mlp_dropout",
    "cls_id": "cls_token_id",
    "sep_id": "sep_token_id",
}
CONFIG_KEYS = {
    "bert": BERT_KEYS,
    "roberta": BERT_KEYS,
    "modernbert": MODERNBERT_KEYS,
}
ACTIVATION_KEY = {
    "bert": "hidden_act",
    "roberta": "hidden_act",
    "modernbert": "hidden_activation",
}
# transformers' defaults for the keys a config.json may leave out or set to null (transformers
# writes each key, hand-written files may not), where our presets differ. Not the [CLS] and [SEP]
# ids: no forward reads them, and a byte model left without them keeps ours.
BERT_DEFAULTS = dict(
    vocab_size=30522,
    pad_token_id=0,
    layer_norm_eps=1e-12,
    type_vocab_size=2,
    max_position_embeddings=512,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    intermediate_size=3072,  # not 4 x hidden_size: a fixed default, whatever the width
)
HF_DEFAULTS = {
    "bert": BERT_DEFAULTS,
    # RobertaConfig is BertConfig's, but for its vocabulary and special ids
    "roberta": dict(BERT_DEFAULTS, vocab_size=50265, pad_token_id=1),
    "modernbert": dict(vocab_size=50368, pad_token_id=50283, intermediate_size=1152),
}
# ModernBERT's layer_types entries
GLOBAL, LOCAL = "full_attention", "sliding_attention"
# config.json's keys that are read before a Config checks its fields, and the JSON each must hold
READ_FIRST = {
    "model_type": (str, "a string"),
    "vocab_size": (int, "a whole number"),
    "max_position_embeddings": (int, "a whole number"),
    "sliding_window": (int, "a whole number"),
    "num_labels": (int, "a whole number"),
    "id2label": (dict, "an object"),
    "layer_types": (list, "a list"),
}

# -------------------------------------------------------------------------------------------------
# Parameters: our module (or parameter) -> transformers', per family. {base} is the base model's
# prefix ("bert.", "roberta.", "model."), empty in a checkpoint of the base model itself.
MODULES = {
    "bert": {
        "tok_embed": "{base}embeddings.word_embeddings",
        "pos_embed": "{base}embeddings.position_embeddings",
        "type_embed": "{base}embeddings.token_type_embeddings",
        "embed_norm": "{base}embeddings.LayerNorm",
        "mlm_head.dense": "cls.predictions.transform.dense",
        "mlm_head.norm": "cls.predictions.transform.LayerNorm",
        "mlm_head.bias": "cls.predictions.bias",
        "pooler": "{base}pooler.dense",
        "nsp_head": "cls.seq_relationship",
    },
    "roberta": {
        "tok_embed": "{base}embeddings.word_embeddings",
        "pos_embed": "{base}embeddings.position_embeddings",
        "type_embed": "{base}embeddings.token_type_embeddings",
        "embed_norm": "{base}embeddings.LayerNorm",
        "mlm_head.dense": "lm_head.dense",
        "mlm_head.norm": "lm_head.layer_norm",
        "mlm_head.bias": "lm_head.bias",
    },
    "modernbert": {
        "tok_embed": "{base}embeddings.tok_embeddings",
        "embed_norm": "{base}embeddings.norm",
        "final_norm": "{base}final_norm",
        "mlm_head.dense": "head.dense",
        "mlm_head.norm": "head.norm",
        "mlm_head.bias": "decoder.bias",
    },
}
BERT_LAYER = {
    "attn_norm": "attention.output.LayerNorm",
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn.out": "attention.output.dense",
    "mlp_norm": "output.LayerNorm",
    "mlp.up": "intermediate.dense",
    "mlp.down": "output.dense",
}
MODERNBERT_LAYER = {
    "attn_norm": "attn_norm",
    "attn.qkv": "attn.Wqkv",
    "attn.out": "attn.Wo",
    "mlp_norm": "mlp_norm",
    "mlp.up": "mlp.Wi",
    "mlp.down": "mlp.Wo",
}
LAYERS = {
    "bert": ("{base}encoder.layer.{i}.", BERT_LAYER),
    "roberta": ("{base}encoder.layer.{i}.", BERT_LAYER),
    "modernbert": ("{base}layers.{i}.", MODERNBERT_LAYER),
}
BASE_PREFIX = {
    "bert": "bert.",
    "roberta": "roberta.",
    "modernbert": "model.",
}
# Keys a checkpoint may hold that we do not read.
IGNORED_SUFFIXES = (
    "position_ids",  # buffers
    "token_type_ids",
    "decoder.weight",  # tied to the token embedding
    "decoder.bias",  # BERT and RoBERTa: tied to the head's bias
    "pooler.dense.weight",  # a pooler in a checkpoint of the MLM class, which does not use it
    "pooler.dense.bias",
)
# The copies of tied weights that IGNORED_SUFFIXES skips, and what each must equal: our decoder is
# the token embedding, and BERT's and RoBERTa's decoder bias is their head's.
TIED = {"decoder.weight": "tok_embed.weight", "decoder.bias": "mlm_head.bias"}
HEAD_PREFIXES = ("cls.", "lm_head.", "head.", "decoder.")  # absent from a base model's checkpoint
# Each classifier's parameters: ours -> transformers' (BERT's pooler is MODULES' "pooler").
ROBERTA_ROWS = {"classifier.dense": "classifier.dense", "classifier.out": "classifier.out_proj"}
MODERNBERT_HEAD = {
    "classifier.dense": "head.dense",
    "classifier.norm": "head.norm",
    "classifier.out": "classifier",
}
CLASSIFIER_MODULES = {
    ("bert", "sequence"): {"classifier.out": "classifier"},
    ("bert", "token"): {"classifier.out": "classifier"},
    ("bert", "span"): {"classifier.out": "qa_outputs"},
    ("bert", "choice"): {"classifier.out": "classifier"},
    ("roberta", "sequence"): ROBERTA_ROWS,
    ("roberta", "token"): {"classifier.out": "classifier"},
    ("roberta", "span"): {"classifier.out": "qa_outputs"},
    ("roberta", "choice"): {"classifier.out": "classifier", "pooler": "{base}pooler.dense"},
    ("modernbert", "sequence"): MODERNBERT_HEAD,
    ("modernbert", "token"): MODERNBERT_HEAD,
    ("modernbert", "span"): MODERNBERT_HEAD,
    ("modernbert", "choice"): MODERNBERT_HEAD,
}


def as_tuple(names) -> tuple:
    if isinstance(names, str):
        return (names,)
    return names


def parameter_names(model: te.TinyEncoder, base: bool = False) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the transformers key(s) holding it: three for the fused q, k, v."""
    arch = model.cfg.arch
    prefix = BASE_PREFIX[arch]
    if base:
        prefix = ""
    table = {**MODULES[arch], **CLASSIFIER_MODULES.get((arch, model.cfg.classifier), {})}
    modules = {ours: (theirs.format(base=prefix),) for ours, theirs in table.items()}
    stem, layer_table = LAYERS[arch]
    for i in range(model.cfg.layers):
        layer_prefix = stem.format(base=prefix, i=i)
        for ours, theirs in layer_table.items():
            modules[f"layers.{i}.{ours}"] = tuple(layer_prefix + n for n in as_tuple(theirs))
    names = {}
    for name, _ in model.named_parameters():
        if name in modules:  # a parameter named outright, such as the decoder's bias
            names[name] = modules[name]
        else:
            module, leaf = name.rsplit(".", 1)
            names[name] = tuple(f"{m}.{leaf}" for m in modules[module])
    return names


# -------------------------------------------------------------------------------------------------
# Config translation
def activation_from_hf(hf: dict, key: str) -> str:
    """config.json's activation under key (gelu where it has none) as ours."""
    name = hf.get(key) or "gelu"
    for ours, theirs in ACTIVATIONS.items():
        if name in theirs:
            return ours
    supported = [n for names in ACTIVATIONS.values() for n in names]
    raise ValueError(f"{key} {name!r} is not supported; supported: {supported}")


def config_from_hf(hf: dict, nsp=False, classifier="none", base=False) -> te.Config:
    """A transformers config.json, including the hub's legacy ModernBERT keys, as a Config. base:
    the checkpoint holds no head, so the keys of heads say nothing of it."""
    arch = hf.get("model_type")
    if arch not in te.PRESETS:
        raise ValueError(f"model_type {arch!r} is not supported; supported: {list(te.PRESETS)}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        # a decoder's attention is causal (or reads an encoder): ours sees both sides
        raise ValueError("is_decoder and add_cross_attention are not supported (an encoder only)")
    pad_null = null_pad_id(hf, arch)
    hf = {**HF_DEFAULTS[arch], **{key: value for key, value in hf.items() if value is not None}}
    fields = dict(te.PRESETS[arch], nsp=nsp, classifier=classifier)
    fields["num_labels"] = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if hf.get("classifier_dropout") is not None:
        fields["classifier_dropout"] = hf["classifier_dropout"]
    elif arch != "modernbert":  # BERT and RoBERTa fall back on their hidden dropout
        fields["classifier_dropout"] = hf["hidden_dropout_prob"]
    if arch == "roberta" and classifier == "choice":  # its head reads the hidden dropout only
        fields["classifier_dropout"] = hf["hidden_dropout_prob"]
    if arch == "modernbert":  # BERT's and RoBERTa's heads read the first token, whatever it says
        fields["classifier_pooling"] = hf.get("classifier_pooling", "cls")
    for ours, theirs in CONFIG_KEYS[arch].items():
        if hf.get(theirs) is not None:
            fields[ours] = hf[theirs]
    special_ids_in_vocabulary(fields, pad_null)
    fields["act"] = activation_from_hf(hf, ACTIVATION_KEY[arch])
    if arch == "modernbert":
        return modernbert_config(hf, fields, base)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        kind = hf["position_embedding_type"]
        raise ValueError(f"position_embedding_type {kind!r} is not supported; only 'absolute'")
    fields["pos_offset"] = 0
    if arch == "roberta":
        fields["pos_offset"] = fields["pad_id"] + 1
    fields["max_len"] = hf["max_position_embeddings"] - fields["pos_offset"]
    fields["embed_dropout"] = fields["resid_dropout"]  # one knob in transformers
    return te.Config(**fields)


def null_pad_id(hf: dict, arch: str) -> bool:
    """Whether config.json's pad_token_id is null: transformers' token embedding then has no
    padding row (load unsets ours). RoBERTa numbers its positions from the pad id: none, no run."""
    null = "pad_token_id" in hf and hf["pad_token_id"] is None
    if null and arch == "roberta":
        raise ValueError("pad_token_id null: RoBERTa numbers its positions from the pad id")
    return null


def special_ids_in_vocabulary(fields: dict, pad_null: bool = False):
    """[CLS], [SEP] and [MASK] ids that no forward reads, outside this vocabulary (transformers'
    ModernBERT defaults to 50281 and 50282 whatever the vocabulary, and its config.json holds no
    [MASK]) become pad_id, so that the Config is whole; this vocabulary's own tokenizer knows its
    ids. The pad id, the embedding's padding row, must be in it."""
    vocab = fields["vocab_size"]
    if pad_null and not 0 <= fields["pad_id"] < vocab:
        # no padding row, but ours pads with an id all the same: the byte vocabulary's if it can
        fields["pad_id"] = te.PAD if te.PAD < vocab else 0
    for name in ("cls_id", "sep_id", "mask_id"):
        value = fields.get(name, getattr(te.Config, name))  # eos_token_id may be a list of ids
        if not isinstance(value, int) or not 0 <= value < vocab:
            fields[name] = fields["pad_id"]
    # null reads as transformers' default, as a missing key does (config_from_hf: the pad id)
    if not isinstance(fields["pad_id"], int) or not 0 <= fields["pad_id"] < vocab:
        raise ValueError(f"pad_token_id {fields['pad_id']!r} is outside the vocabulary of {vocab}")


def modernbert_config(hf: dict, fields: dict, base: bool) -> te.Config:
    types = hf.get("layer_types")
    # without layer_types (the hub's configs), global_attn_every_n_layers gives the pattern
    all_global = fields["global_every"] == 1 or fields["layers"] == 1
    if types:
        all_global = LOCAL not in types
    # the period as saved where it gives these types (5 of 3 layers, say), else the first global
    # layer after layer 0
    if types and not all_global and not follows_period(types, fields["global_every"]):
        later_globals = [i for i in range(1, len(types)) if types[i] == GLOBAL]
        fields["global_every"] = min(later_globals, default=len(types))
    thetas = hf.get("rope_parameters") or {}
    if not isinstance(thetas, dict) or not set(thetas) <= {GLOBAL, LOCAL}:
        # transformers refuses a flat dict too
        raise ValueError(f"rope_parameters must be keyed by {GLOBAL!r} and {LOCAL!r}: {thetas}")
    # rope_scaling: the older configs' key for the same thing, which transformers merges into both
    # kinds' entries (its rope_theta, where it has one, over theirs)
    legacy = hf.get("rope_scaling") or {}
    entries = [*thetas.values(), legacy]
    scaled = [kind for kind in map(rope_type, entries) if kind != "default"]
    if scaled:
        raise ValueError(f"RoPE scaling ({scaled[0]!r}) is not supported; only rope_type 'default'")
    for field, kind in (("rope_theta", GLOBAL), ("rope_theta_local", LOCAL)):
        fields[field] = {**thetas.get(kind, {}), **legacy}.get("rope_theta", fields[field])
    if bool(hf.get("mlp_bias")) != fields["bias"]:
        raise ValueError("attention_bias must equal mlp_bias")
    if not base:  # a base model has no head: the keys of heads say nothing of it
        check_modernbert_heads(hf, fields)
    fields["resid_dropout"] = fields["attn_dropout"]  # one knob drives both in transformers
    # no local layer: no window, whatever local_attention says (global_every as saved)
    fields["window"] = 0 if all_global else window_from_hf(hf, fields["window"])
    cfg = te.Config(**fields)
    if types and len(types) != cfg.layers:  # num_hidden_layers left out or null: 22, as there
        raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={cfg.layers}")
    if types and types != layer_types(cfg):
        raise ValueError(f"layer_types {types} is not 'global every n-th layer', the one pattern")
    return cfg


def follows_period(types: list, period) -> bool:
    """Whether layer_types are global every period-th layer (a period that is no count: no)."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        return False
    return types == [GLOBAL if i % period == 0 else LOCAL for i in range(len(types))]


def check_modernbert_heads(hf: dict, fields: dict):
    """What ModernBERT's heads read and ours would compute otherwise: the MLM decoder's bias (ours
    always has one; a classifier has no decoder), the heads' activation, and which labels sparse
    prediction leaves out (transformers': those of sparse_pred_ignore_index; ours: -100)."""
    mlm = fields["classifier"] == "none"
    if not hf.get("decoder_bias", True) and mlm:
        raise ValueError("decoder_bias must be true: the MLM decoder here always has a bias")
    if activation_from_hf(hf, "classifier_activation") != fields["act"]:
        raise ValueError("classifier_activation must equal hidden_activation")
    ignored = hf.get("sparse_pred_ignore_index", te.IGNORE_INDEX)
    if hf.get("sparse_prediction") and ignored != te.IGNORE_INDEX and mlm:
        raise ValueError(f"sparse_pred_ignore_index {ignored!r} is not supported; only -100")


def rope_type(parameters) -> str:
    """A RoPE entry's rope_type, or "type" as older configs name it (transformers reads both)."""
    if not isinstance(parameters, dict):
        raise ValueError(f"RoPE parameters must be an object, got {parameters!r}")
    return parameters.get("rope_type", parameters.get("type", "default"))


def window_from_hf(hf: dict, window):
    """local_attention, or sliding_window (half of it: ModernBertConfig's alias, which it obeys over
    local_attention), as our window. transformers' local layers reach local_attention // 2 keys each
    side: an odd window of 3 or more is the even one below it."""
    if hf.get("sliding_window") is not None:
        window = 2 * hf["sliding_window"]
    if isinstance(window, int) and window < 2:  # transformers' local layers: each token alone
        raise ValueError(
            f"local_attention {window} (local layers that see no other token) is not supported"
        )
    if isinstance(window, int) and window % 2 == 1:
        return window - 1
    return window


def layer_types(cfg: te.Config) -> list[str]:
    kinds = []
    for i in range(cfg.layers):
        if cfg.is_local(i):
            kinds.append(LOCAL)
        else:
            kinds.append(GLOBAL)
    return kinds


def fixed_fields(cfg: te.Config) -> dict:
    """What each family's transformers classes hard-code; a Config that differs cannot be saved."""
    if cfg.arch == "modernbert":
        return dict(
            positions="rope",
            prenorm=True,
            glu=True,
            type_vocab=0,
            pos_offset=0,
            resid_dropout=cfg.attn_dropout,
        )
    pos_offset = 0
    if cfg.arch == "roberta":
        pos_offset = cfg.pad_id + 1
    fixed = dict(
        positions="learned",
        prenorm=False,
        glu=False,
        bias=True,
        norm_bias=True,
        head_bias=True,
        window=0,
        mlp_dropout=0.0,
        embed_dropout=cfg.resid_dropout,
        pos_offset=pos_offset,
        classifier_pooling="cls",  # their heads read the first token
    )
    # RobertaForMultipleChoice's head drops with hidden_dropout_prob, whatever classifier_dropout is
    if cfg.arch == "roberta" and cfg.classifier == "choice":
        fixed["classifier_dropout"] = cfg.resid_dropout
    return fixed


def class_name(cfg: te.Config) -> str:
    """The transformers class a saved cfg loads as."""
    if cfg.classifier != "none":
        return STEMS[cfg.arch] + TASK_SUFFIXES[cfg.classifier]
    if cfg.nsp:
        return "BertForPreTraining"
    return STEMS[cfg.arch] + "ForMaskedLM"


def config_to_hf(cfg: te.Config, labels=None) -> dict:
    """The transformers config.json for cfg; refuses configs no transformers class expresses.
    labels names the classes (id2label), LABEL_0, LABEL_1, ... where not given."""
    bad = {k: getattr(cfg, k) for k, v in fixed_fields(cfg).items() if getattr(cfg, k) != v}
    if cfg.arch != "modernbert" and cfg.type_vocab < 1:
        bad["type_vocab"] = cfg.type_vocab
    if cfg.arch == "roberta" and cfg.classifier == "none":
        require_exact_gelu(cfg)
    refuse_what_transformers_lacks(cfg)
    if bad:
        raise ValueError(f"this {cfg.arch} config has no transformers equivalent; offending: {bad}")
    act = ACTIVATIONS[cfg.act][0]
    hf = {theirs: getattr(cfg, ours) for ours, theirs in CONFIG_KEYS[cfg.arch].items()}
    hf.update(model_type=cfg.arch, tie_word_embeddings=True, architectures=[class_name(cfg)])
    if cfg.classifier != "none":
        count = cfg.num_labels
        if cfg.classifier == "span":  # qa_outputs' start and end
            count = 2
        labels = label_names(labels, count)
        hf["id2label"] = dict(enumerate(labels))
        hf["label2id"] = {label: i for i, label in enumerate(labels)}
        hf["classifier_dropout"] = cfg.classifier_dropout
    if cfg.classifier == "sequence":  # transformers' loss then is ours, whatever the labels' dtype
        hf["problem_type"] = problem_type(cfg)
    if cfg.arch == "modernbert":
        hf.update(modernbert_keys(cfg, act))
        return hf
    hf.update(
        hidden_act=act,
        max_position_embeddings=cfg.max_len + cfg.pos_offset,
        position_embedding_type="absolute",
    )
    return hf


def problem_type(cfg: te.Config) -> str:
    """A sequence classifier's loss here, in transformers' words: mean squared error for one
    label, cross-entropy over more."""
    if cfg.num_labels == 1:
        return "regression"
    return "single_label_classification"


def check_problem_type(asked, cfg: te.Config):
    """A config.json's problem_type that asks a sequence classifier for another loss than ours
    (multi-label's binary cross-entropy, regression over several outputs) is refused."""
    if cfg.classifier == "sequence" and asked not in (None, problem_type(cfg)):
        raise ValueError(
            f"problem_type {asked!r} with num_labels={cfg.num_labels} is not supported: "
            f"a sequence classifier here computes {problem_type(cfg)!r}"
        )


def label_names(labels, count: int) -> list:
    """A classifier's class names in order: LABEL_0, LABEL_1, ... where not given; a list of
    names; or transformers' id2label, a dict of id -> name (ids as numbers or as JSON's strings)."""
    if labels is None:
        return [f"LABEL_{i}" for i in range(count)]
    if isinstance(labels, dict):
        by_id = {str(key): name for key, name in labels.items()}
        if sorted(by_id) != sorted(str(i) for i in range(count)):
            raise ValueError(
                f"labels: an id2label dict needs the ids 0 to {count - 1}, got {list(labels)}"
            )
        labels = [by_id[str(i)] for i in range(count)]
    if not isinstance(labels, (list, tuple)):
        raise ValueError(
            f"labels must be a list of class names or an id2label dict, got {labels!r}"
        )
    if len(labels) != count:
        raise ValueError(f"{len(labels)} label names for num_labels={count}")
    if len(set(labels)) != count:  # label2id would lose one
        raise ValueError(f"labels must differ from each other, got {list(labels)}")
    return [json_key(name) for name in labels]


def json_key(name):
    """A label name as label2id's JSON keys take it: numpy's numbers (np.unique's) as Python's."""
    if name is None or isinstance(name, (str, int, float)):
        return name
    if isinstance(name, numbers.Number):
        return plain_number(name)
    raise ValueError(f"labels: each name must be a string or a number, got {name!r}")


def refuse_what_transformers_lacks(cfg: te.Config):
    """An NSP head outside BERT (no transformers class has one); a byte-level RoBERTa whose pad_id
    is a byte (its positions count from input_ids != pad_token_id: that byte would vanish)."""
    if cfg.nsp and cfg.arch != "bert":
        raise ValueError(
            f"nsp=True: transformers has a next-sentence head for BERT only, not {cfg.arch}"
        )
    if cfg.arch == "roberta" and cfg.vocab_size == te.VOCAB_SIZE and cfg.pad_id < 256:
        raise ValueError(
            f"a byte-level RoBERTa with pad_id={cfg.pad_id}, a byte: transformers "
            "would read that byte as padding; use an id from 256 on"
        )


def modernbert_keys(cfg: te.Config, act: str) -> dict:
    """ModernBERT's config.json keys beyond CONFIG_KEYS' one-to-one ones."""
    thetas = {GLOBAL: cfg.rope_theta, LOCAL: cfg.rope_theta_local}
    return dict(
        classifier_pooling=cfg.classifier_pooling,
        hidden_activation=act,
        classifier_activation=act,
        mlp_bias=cfg.bias,
        decoder_bias=True,
        local_attention=cfg.window or 2 * cfg.max_len,  # all layers global: any window
        layer_types=layer_types(cfg),
        rope_parameters={k: {"rope_type": "default", "rope_theta": t} for k, t in thetas.items()},
        bos_token_id=cfg.cls_id,
        eos_token_id=cfg.sep_id,
    )


# -------------------------------------------------------------------------------------------------
# Weights
def safetensors_torch():
    """The safetensors package's torch functions; without the package, an error that says so (it
    is an extra: pip install safetensors)."""
    try:
        import safetensors.torch
    except ImportError:
        message = "model.safetensors needs the safetensors package: pip install safetensors"
        raise ImportError(message) from None
    return safetensors.torch


def weight_files(path: str) -> list[str]:
    """model.safetensors or pytorch_model.bin, or the shards their .index.json lists (what
    save_pretrained writes for a model above its max_shard_size)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return [os.path.join(path, name)]
        index = os.path.join(path, f"{name}.index.json")
        if not os.path.exists(index):
            continue
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a readable index of shards ({e!r})") from None
        return [os.path.join(path, shard) for shard in shards]
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin, nor an index of shards")


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, with TF-era LayerNorm names (gamma, beta) renamed."""
    weights = {}
    files = weight_files(path)
    try:
        for file in files:
            if file.endswith(".safetensors"):
                weights.update(safetensors_torch().load_file(file))
            else:  # weights only: no code runs on load
                weights.update(torch.load(file, map_location="cpu", weights_only=True))
    # safetensors missing (its message says what to install), or memory: not a bad file
    except (ImportError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' and torch's errors alike: a bad file
        raise ValueError(
            f"{path}: its weights are not readable ({type(e).__name__}: {e})"
        ) from None
    renamed = {}
    for key, value in weights.items():
        if key.endswith(".gamma"):
            key = key.removesuffix(".gamma") + ".weight"
        elif key.endswith(".beta"):
            key = key.removesuffix(".beta") + ".bias"
        renamed[key] = value
    return renamed


def read_config(path: str) -> dict:
    """config.json, as a dict; a ValueError that names the file where it is not one."""
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: not a JSON object, but a {type(hf).__name__}")
    for key, (kind, what) in READ_FIRST.items():
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ValueError(f"{file}: {key} must be {what}, got {value!r}")
    return hf


def load(path: str) -> te.TinyEncoder:
    """A TinyEncoder from a transformers checkpoint directory, checking every name and shape; in
    eval mode, as transformers' from_pretrained gives its models (model.train() to fine-tune), and
    in fp32 whatever the checkpoint stores (model.to(dtype) for another)."""
    hf = read_config(path)
    kind = class_of(hf, path)
    weights = read_weights(path)
    classifier = "none"
    for task, suffix in TASK_SUFFIXES.items():
        if kind.endswith(suffix):
            classifier = task
    # an NSP head with a classifier, or in another family than BERT's: weights that do not match
    # the class, refused as such below
    is_bert = hf.get("model_type") == "bert"
    nsp = "cls.seq_relationship.weight" in weights and classifier == "none" and is_bert
    base = not any(key.startswith(tuple(BASE_PREFIX.values())) for key in weights)
    model = te.TinyEncoder(config_from_hf(hf, nsp=nsp, classifier=classifier, base=base))
    check_problem_type(hf.get("problem_type"), model.cfg)
    if null_pad_id(hf, model.cfg.arch):
        # no padding row, as in transformers' embedding: that row's gradient is not held at 0
        model.tok_embed.padding_idx = None
    names = parameter_names(model, base)
    check_names(path, kind, weights, names, base)
    if model.cfg.arch == "roberta" and model.mlm_head is not None and not base:
        require_exact_gelu(model.cfg)
    copy_weights(path, model, weights, names)
    if base and model.mlm_head is not None:  # as transformers' *ForMaskedLM from a base model
        warnings.warn(f"{path} holds a base model: the MLM head starts fresh, a pooler goes unread")
    if model.cfg.classifier in ("sequence", "token", "span") and hf.get("id2label"):
        # the class names, for save to write back (names only: an id2label out of order is left)
        with contextlib.suppress(ValueError):
            model.label_names = label_names(hf["id2label"], model.cfg.num_labels)
    return model.eval()


def class_of(hf: dict, path: str) -> str:
    """The transformers class config.json names (the first of architectures; a base model's where
    it names none), one of CLASSES."""
    classes = hf.get("architectures") or [None]
    if not isinstance(classes, list):  # a hand-written config's one class, not in a list
        classes = [classes]
    kind = classes[0]
    if kind is None:
        kind = BASE_CLASSES.get(hf.get("model_type"))
    if not isinstance(kind, str) or kind not in CLASSES:
        raise ValueError(
            f"{path}: architecture {kind!r} is not supported; supported: {list(CLASSES)}"
        )
    return kind


def copy_weights(path: str, model: te.TinyEncoder, weights: dict, names: dict):
    """Each of our parameters from its transformers key(s), where the checkpoint holds them."""
    with torch.no_grad():
        for ours, theirs in names.items():
            if not all(n in weights for n in theirs):
                continue
            param = model.get_parameter(ours)
            # q, k, v stack into one projection: each part checked before they are joined
            for name, part in zip(theirs, param.chunk(len(theirs))):
                if weights[name].shape != part.shape:
                    shape, expected = tuple(weights[name].shape), tuple(part.shape)
                    raise ValueError(f"{path}: {name} has shape {shape}, expected {expected}")
            param.copy_(torch.cat([weights[n] for n in theirs]))


def check_names(path: str, kind: str, weights: dict, names: dict, base: bool):
    """Every parameter in the checkpoint and nothing else, but what IGNORED_SUFFIXES skips; each
    copy of a tied weight equal to what it is tied to (an untied decoder has no place here)."""
    wanted = {n for group in names.values() for n in group}
    # a base model has no MLM head: ours keeps its fresh init
    missing = [n for n in wanted if n not in weights and not (base and n.startswith(HEAD_PREFIXES))]
    unexpected = [k for k in weights if k not in wanted and not k.endswith(IGNORED_SUFFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match {kind}: missing {sorted(missing)[:8]}, unexpected "
            f"{unexpected[:8]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    if "mlm_head.bias" not in names:  # a classifier: no decoder to tie
        return
    for key in weights:
        suffix = ".".join(key.split(".")[-2:])  # "decoder.weight", "decoder.bias", ...
        if key in wanted or suffix not in TIED:
            continue
        tied_to = names[TIED[suffix]][0]
        if tied_to in weights and not torch.equal(weights[key], weights[tied_to]):
            raise ValueError(
                f"{path}: {key} differs from {tied_to}: an untied decoder "
                "(tie_word_embeddings=false) is not supported; ours is the token embedding"
            )


def require_exact_gelu(cfg: te.Config):
    """RoBERTa's MLM head applies the exact GELU whatever hidden_act says; ours applies cfg.act."""
    if cfg.act != "gelu":
        raise ValueError(f"a RoBERTa MLM head with act={cfg.act!r}: transformers' applies 'gelu'")


def save(model: te.TinyEncoder, path: str, labels=None):
    """Write what transformers' Auto classes and sentence-transformers load: config.json and
    model.safetensors; for the byte vocabulary, its tokenizer and a mean-pooling
    sentence-transformers setup (for another vocabulary, a warning: copy its own tokenizer files).
    labels: a classifier's class names, in order (see label_names); by default those load read.
    A torch.compile'd model saves as the model it wraps."""
    safetensors_torch()  # before anything is written
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not isinstance(model, te.TinyEncoder):
        raise ValueError(f"save takes a TinyEncoder, got {type(model).__name__}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save: {path} is a file, not a folder to write a checkpoint into")
    if labels is None:  # the names load read from the checkpoint, if any
        labels = getattr(model, "label_names", None)
    files = {"config.json": config_to_hf(model.cfg, labels)}
    if has_byte_vocabulary(model.cfg):
        files["tokenizer.json"] = tokenizer_json(model.cfg)
        files["tokenizer_config.json"] = tokenizer_config(model.cfg)
        files.update(sentence_transformers_files(model.cfg))
    else:  # transformers' AutoTokenizer would make one of the folder that reads text as [UNK]
        warnings.warn(tokenizer_warning(path, model.cfg))
    # every file's text before the first is written: a value JSON cannot hold writes no file
    texts = {
        name: json.dumps(content, indent=2, ensure_ascii=False, default=plain_number)
        for name, content in files.items()
    }
    weights = {}
    for ours, theirs in parameter_names(model).items():
        parts = model.get_parameter(ours).detach().chunk(len(theirs))  # our qkv splits in three
        for name, part in zip(theirs, parts):
            weights[name] = part.contiguous().cpu().clone()
    write_weights(weights, path)
    for name, text in texts.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


def write_weights(weights: dict, path: str):
    """model.safetensors in the folder path, made if need be. A write cut short (a full disk)
    leaves neither the file nor a folder made for it, and raises OSError, as open() would:
    safetensors' own error is not one."""
    import safetensors  # its error class; safetensors_torch() has found the package

    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    weights_file = os.path.join(path, "model.safetensors")
    try:
        safetensors_torch().save_file(weights, weights_file, metadata={"format": "pt"})
    except safetensors.SafetensorError as e:
        with contextlib.suppress(OSError):
            os.remove(weights_file)
        with contextlib.suppress(OSError):
            if created:
                os.rmdir(path)
        raise OSError(f"model.safetensors: {e}") from e


def plain_number(value):
    """JSON for a number of another library's type (numpy's int64, float32), which Config takes."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -------------------------------------------------------------------------------------------------
# The byte vocabulary as a transformers tokenizer: a BPE model without merges over GPT-2's table
# of byte-level characters, so that every byte is one token whose id is the byte, and a template
# that frames text as [CLS] bytes [SEP] (a pair as [CLS] A [SEP] B [SEP]).
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def byte_characters() -> list[str]:
    """GPT-2's printable stand-in for each byte: byte_characters()[b] stands for byte b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    characters = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in characters]
    for n, b in enumerate(others):
        characters[b] = chr(256 + n)
    return [characters[b] for b in range(256)]


def special_ids(cfg: te.Config) -> dict[str, int]:
    """The special tokens and their ids; every other id past the bytes, unused, as [unused0],
    [unused1], ..., so that each id has a token (the tokenizers library renumbers added tokens
    that leave a gap)."""
    ids = {
        "[PAD]": cfg.pad_id,
        "[CLS]": cfg.cls_id,
        "[SEP]": cfg.sep_id,
        "[MASK]": cfg.mask_id,
    }
    unused = [i for i in range(256, cfg.vocab_size) if i not in ids.values()]
    for n, token_id in enumerate(unused):
        ids[f"[unused{n}]"] = token_id
    return ids


def has_byte_vocabulary(cfg: te.Config) -> bool:
    """The byte vocabulary: the 256 bytes, then the special ids (pipelines' check_bytes, and no
    special id that is a byte). A checkpoint of another vocabulary keeps its own tokenizer."""
    specials = (cfg.pad_id, cfg.cls_id, cfg.sep_id, cfg.mask_id)
    return cfg.vocab_size == te.VOCAB_SIZE and min(specials) >= 256


def tokenizer_json(cfg: te.Config) -> dict:
    """tokenizer.json for the tokenizers library: bytes in, our ids out."""
    ids = special_ids(cfg)
    second_type = 1 if cfg.type_vocab > 1 else 0  # BERT's segment B; one segment elsewhere

    def piece(kind, name, type_id):
        return {kind: {"id": name, "type_id": type_id}}

    single = [piece("SpecialToken", "[CLS]", 0), piece("Sequence", "A", 0)]
    single.append(piece("SpecialToken", "[SEP]", 0))
    pair = single + [
        piece("Sequence", "B", second_type),
        piece("SpecialToken", "[SEP]", second_type),
    ]
    added = []
    for token, token_id in ids.items():
        flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False)
        added.append(dict(id=token_id, content=token, **flags, special=True))
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)
    # each character its own word: the question-answering pipeline widens a span to whole words,
    # and with the text one word it answered with the whole context
    characters = dict(type="Split", pattern={"Regex": r"[\s\S]"}, behavior="Isolated", invert=False)
    words = dict(type="Sequence", pretokenizers=[characters, byte_level])
    vocab = {character: b for b, character in enumerate(byte_characters())}
    vocab.update(ids)  # the ids past the bytes, in the vocabulary too: tokenizers keeps them
    framing = {name: dict(id=name, ids=[ids[name]], tokens=[name]) for name in ("[CLS]", "[SEP]")}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": words,
        "post_processor": dict(
            type="TemplateProcessing", single=single, pair=pair, special_tokens=framing
        ),
        "decoder": byte_level,
        "model": dict(type="BPE", dropout=None, unk_token=None, vocab=vocab, merges=[]),
    }


def tokenizer_config(cfg: te.Config) -> dict:
    inputs = ["input_ids", "attention_mask"]
    if cfg.type_vocab > 1:  # BERT's segments
        inputs.insert(1, "token_type_ids")
    return dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=cfg.max_len,
        model_input_names=inputs,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def tokenizer_warning(path: str, cfg: te.Config) -> str:
    """What save says of a vocabulary other than the byte one: no tokenizer written, and which of
    the files a byte-level save writes beside the model the folder holds, left as they are."""
    byte_files = ["tokenizer.json", "tokenizer_config.json", *sentence_transformers_files(cfg)]
    found = [name for name in byte_files if os.path.exists(os.path.join(path, name))]
    if found:
        check = "check that they are this model's, not a byte-level save's"
        return f"{path}: no tokenizer written (not the byte vocabulary); it holds {found}: {check}"
    copy = "copy the tokenizer files of the checkpoint it came from beside it"
    return f"{path} holds no tokenizer: the vocabulary is not the byte one; {copy}"


def sentence_transformers_files(cfg: te.Config) -> dict[str, object]:
    """The files SentenceTransformer(dir) reads: the transformer, then mean pooling over every
    token that is not padding ([CLS] and [SEP] included)."""
    modules = [
        dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
        dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling"),
    ]
    pooling = dict(word_embedding_dimension=cfg.hidden, pooling_mode_mean_tokens=True)
    return {
        "modules.json": modules,
        "sentence_bert_config.json": dict(max_seq_length=cfg.max_len, do_lower_case=False),
        "1_Pooling/config.json": pooling,
    }


# -------------------------------------------------------------------------------------------------
# Export a train.py checkpoint: python tinyencoder_hf.py out/ckpt_best.pt out/hf
def main():
    import argparse

    parser = argparse.ArgumentParser(description="Export a train.py checkpoint for transformers.")
    parser.add_argument("checkpoint", help="a train.py or finetune.py checkpoint (ckpt_best.pt)")
    parser.add_argument("out_dir", help="the folder to write")
    args = parser.parse_args()
    from runs import die, load_checkpoint  # train.py's and finetune.py's, beside this file

    try:
        safetensors_torch()
    except ImportError as e:
        die(str(e))

    state, cfg = load_checkpoint(args.checkpoint, "checkpoint")
    model = te.TinyEncoder(cfg)
    model.load_state_dict(state["model"])
    try:  # a finetune.py checkpoint names its labels
        save(model, args.out_dir, state.get("labels"))
    except ValueError as e:  # out_dir is a file, say
        die(str(e))
    except OSError as e:  # inside a file, read-only, a full disk
        die(f"cannot write {args.out_dir} ({e.strerror or e})")
    print(f"wrote {args.out_dir}: {', '.join(sorted(os.listdir(args.out_dir)))}")


if __name__ == "__main__":
    main()
