"""The model zoo: architectures of ``transformers``, each from its default config shrunk.

Every entry keeps its config's defaults (dropout probabilities, tied or untied head,
activation, normalization) and changes only what makes it small: layers, widths, heads,
vocabulary and positions (token ids moved into the small vocabulary), plus ``use_cache=False``
where a config has a cache. Weights are random (no download). ``Zoo.batch(rows, size, seed)``
gives an example call (a tensor, or a :class:`~gpipe.capture.Sample` with keywords) and
targets of that batch; ``Zoo.loss`` turns the model's output and the targets into a scalar.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpipe.capture import Sample

VOCAB = 64
HIDDEN = 32
HEADS = 4
FF = 64
LAYERS = 2
POSITIONS = 64
CLASSES = 5
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclasses.dataclass(frozen=True)
class Zoo:
    """One architecture: its ``transformers`` config and model classes, the sizes changed from
    the config's defaults, what it reads and how big its sample is."""

    name: str
    family: str  # decoder, encoder, encoder-decoder, vision, moe
    config: str
    model: str
    sizes: dict
    inputs: str = "tokens"  # "tokens", "seq2seq" (tokens and decoder tokens) or "image"
    size: int = 8  # the sample's sequence length or image side
    dtype: torch.dtype = torch.float64  # float32 where a kernel refuses float64

    def build(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model with its weights drawn from seed 0, in ``dtype`` (default: the zoo's),
        in training mode."""
        import transformers

        torch.manual_seed(0)
        cfg = shrunk(getattr(transformers, self.config), **self.sizes)
        return getattr(transformers, self.model)(cfg).to(dtype or self.dtype).train()

    def batch(
        self,
        rows: int = 4,
        size: int | None = None,
        seed: int = 1,
        dtype: torch.dtype | None = None,
    ) -> tuple[Any, torch.Tensor]:
        """``(sample, targets)``: ``rows`` examples of sequence length (or image side)
        ``size`` (default: the zoo's), drawn from ``seed``."""
        size = self.size if size is None else size
        dtype = dtype or self.dtype
        g = torch.Generator().manual_seed(seed)
        if self.inputs == "image":
            x = torch.randn(rows, 3, size, size, generator=g, dtype=dtype)
            return x, torch.randint(0, CLASSES, (rows,), generator=g)
        x = torch.randint(3, VOCAB, (rows, size), generator=g)
        if self.inputs == "seq2seq":
            dec = torch.randint(3, VOCAB, (rows, size - 2), generator=g)
            return Sample(x, decoder_input_ids=dec), torch.randint(0, VOCAB, dec.shape, generator=g)
        if self.family == "encoder":
            return x, torch.randn(rows, size, HIDDEN, generator=g, dtype=dtype)
        return x, torch.randint(0, VOCAB, (rows, size), generator=g)


def has_dropout(model: nn.Module, sample: Any) -> bool:
    """Whether ``model`` draws random numbers in training: two training forwards on
    ``sample`` from two seeds differ (a functional dropout counts, as ``nn.Dropout`` does)."""
    outs = []
    with torch.random.fork_rng(), torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(first_tensor(call(model, sample)))
    return not torch.equal(*outs)


def first_tensor(out: Any) -> torch.Tensor:
    """The main output: ``logits``, else ``last_hidden_state``."""
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against class or token targets; for an encoder, the mean
    squared error of its last hidden state against targets of that shape, plus the pooled
    output's mean square (so the pooler's parameters have gradients too)."""
    if "logits" in out:
        logits = out["logits"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    value = F.mse_loss(out["last_hidden_state"], targets)
    if out.get("pooler_output") is not None:
        value = value + out["pooler_output"].square().mean()
    return value


def call(model: nn.Module, sample: Any) -> Any:
    """``model`` called on an example as ``gpipe.Pipe`` is called on it."""
    if isinstance(sample, Sample):
        return model(*sample.args, **sample.kwargs)
    return model(sample)


def shrunk(config_class: type, **sizes: Any):
    """``config_class()``'s defaults with ``sizes`` changed, no cache, and every special token
    id that falls outside the small vocabulary moved into it."""
    defaults = config_class()
    for i, key in enumerate(TOKEN_IDS):
        value = getattr(defaults, key, None)
        if isinstance(value, int) and value >= VOCAB:
            sizes.setdefault(key, i)
    if hasattr(defaults, "use_cache"):
        sizes.setdefault("use_cache", False)
    return config_class(**sizes)


DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FF,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": POSITIONS,
}
GQA = {**DECODER, "num_key_value_heads": 2}
ENCODER = {**DECODER, "max_position_embeddings": POSITIONS + 2}  # RoBERTa offsets positions
GPT2 = {"n_layer": LAYERS, "n_embd": HIDDEN, "n_head": HEADS, "vocab_size": VOCAB}
OPT = {**DECODER, "ffn_dim": FF, "word_embed_proj_dim": HIDDEN}
DISTILBERT = {
    "vocab_size": VOCAB,
    "dim": HIDDEN,
    "hidden_dim": FF,
    "n_layers": LAYERS,
    "n_heads": HEADS,
    "max_position_embeddings": POSITIONS,
}
T5 = {
    "vocab_size": VOCAB,
    "d_model": HIDDEN,
    "d_kv": HIDDEN // HEADS,
    "d_ff": FF,
    "num_layers": LAYERS,
    "num_heads": HEADS,
}
BART = {
    "vocab_size": VOCAB,
    "d_model": HIDDEN,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "encoder_ffn_dim": FF,
    "decoder_ffn_dim": FF,
    "max_position_embeddings": POSITIONS,
}
VIT = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FF,
    "num_labels": CLASSES,
}
CONVNEXT = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 2, 1], "num_labels": CLASSES}
MIXTRAL = {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2}
QWEN2MOE = {
    **GQA,
    "moe_intermediate_size": HIDDEN,
    "shared_expert_intermediate_size": HIDDEN,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}
ERNIE_MOE = {
    **GQA,
    "moe_intermediate_size": HIDDEN,
    "moe_k": 2,
    "moe_num_experts": 4,
    "moe_layer_end_index": LAYERS - 1,
}

ZOO = {
    z.name: z
    for z in [
        Zoo("gpt2", "decoder", "GPT2Config", "GPT2LMHeadModel", GPT2),
        Zoo("llama", "decoder", "LlamaConfig", "LlamaForCausalLM", GQA),
        Zoo("opt", "decoder", "OPTConfig", "OPTForCausalLM", OPT),
        Zoo("gpt_neox", "decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM", DECODER),
        Zoo("bert", "encoder", "BertConfig", "BertModel", ENCODER),
        Zoo("roberta", "encoder", "RobertaConfig", "RobertaModel", ENCODER),
        Zoo("distilbert", "encoder", "DistilBertConfig", "DistilBertModel", DISTILBERT),
        Zoo(
            "t5",
            "encoder-decoder",
            "T5Config",
            "T5ForConditionalGeneration",
            T5,
            "seq2seq",
        ),
        Zoo(
            "bart",
            "encoder-decoder",
            "BartConfig",
            "BartForConditionalGeneration",
            BART,
            "seq2seq",
        ),
        Zoo("vit", "vision", "ViTConfig", "ViTForImageClassification", VIT, "image", 16),
        Zoo(
            "convnext",
            "vision",
            "ConvNextConfig",
            "ConvNextForImageClassification",
            CONVNEXT,
            "image",
            32,
        ),
        # the experts' grouped matrix product takes float32, not float64
        Zoo("mixtral", "moe", "MixtralConfig", "MixtralForCausalLM", MIXTRAL, dtype=torch.float32),
        Zoo(
            "qwen2_moe",
            "moe",
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            QWEN2MOE,
            dtype=torch.float32,
        ),
        # a float32 router (autocast disabled around it) and experts from the second layer on
        Zoo(
            "ernie_moe",
            "moe",
            "Ernie4_5_MoeConfig",
            "Ernie4_5_MoeForCausalLM",
            ERNIE_MOE,
            dtype=torch.float32,
        ),
    ]
}
