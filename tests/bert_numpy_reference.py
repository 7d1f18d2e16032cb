"""An independent NumPy BERT forward pass over HF-named weights, the yardstick for every converted encoder.

Written from the BERT paper / HF BertModel semantics, sharing no code with tasks.encoders: embeddings +
LayerNorm, post-LN transformer layers with exact (erf) GELU, tanh pooler over [CLS]. float64 throughout,
so the only error measured is the encoder's.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf

LAYER_NORM_EPSILON = 1e-12


def hf_weight_shapes(*, vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: int,
                     max_positions: int = 512, type_vocab_size: int = 2) -> dict[str, tuple[int, ...]]:
    """HF BertModel tensor names and shapes (Linear weights are [out, in])."""
    h, i = hidden_size, intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (vocab_size, h),
        "embeddings.position_embeddings.weight": (max_positions, h),
        "embeddings.token_type_embeddings.weight": (type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
    }
    for n in range(num_layers):
        p = f"encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (i, h), (i,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, i), (h,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (h,), (h,)
    return shapes


def random_hf_weights(seed: int = 0, **shape_kwargs) -> dict[str, np.ndarray]:
    """Random float32 weights in HF naming; LayerNorm gains near 1 so activations stay in range."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in hf_weight_shapes(**shape_kwargs).items():
        value = rng.normal(scale=0.2 if name.endswith("weight") else 0.05, size=shape)
        if "LayerNorm.weight" in name:
            value = 1.0 + 0.1 * rng.normal(size=shape)
        weights[name] = value.astype(np.float32)
    return weights


def _layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPSILON) * gamma + beta


def _linear(x, weights, name):
    return x @ weights[name + ".weight"].T + weights[name + ".bias"]  # PyTorch Linear: y = x W^T + b


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def bert_forward(weights: dict[str, np.ndarray], num_heads: int, input_word_ids: np.ndarray,
                 input_mask: np.ndarray, input_type_ids: np.ndarray) -> dict[str, np.ndarray]:
    """(sequence_output [b, s, h], pooled_output [b, h]) of a HF BertModel, inference mode, in float64."""
    w = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in weights.items()}
    batch, seq = input_word_ids.shape
    x = (w["embeddings.word_embeddings.weight"][input_word_ids]
         + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
         + w["embeddings.token_type_embeddings.weight"][input_type_ids])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    # Additive mask: padded keys get -10000 (as HF/TF1 BERT), so softmax gives them ~0 weight.
    additive_mask = (1.0 - input_mask[:, None, None, :].astype(np.float64)) * -10000.0
    num_layers = len({k.split(".")[2] for k in w if k.startswith("encoder.layer.")})
    for n in range(num_layers):
        p = f"encoder.layer.{n}."

        def heads(t):  # [b, s, h] -> [b, heads, s, head_dim]
            return t.reshape(batch, seq, num_heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = (heads(_linear(x, w, p + f"attention.self.{m}")) for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + additive_mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        attention = _linear(context, w, p + "attention.output.dense")
        x = _layer_norm(x + attention, w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"])
        ffn = _linear(_gelu(_linear(x, w, p + "intermediate.dense")), w, p + "output.dense")
        x = _layer_norm(x + ffn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    pooled = np.tanh(_linear(x[:, 0], w, "pooler.dense"))
    return {"sequence_output": x, "pooled_output": pooled}


def max_abs_diffs(reference: dict[str, np.ndarray], outputs, input_mask: np.ndarray) -> tuple[float, float]:
    """(sequence_output over unpadded positions, pooled_output) max absolute differences."""
    keep = np.asarray(input_mask).astype(bool)
    seq = np.abs(np.asarray(outputs["sequence_output"], np.float64) - reference["sequence_output"])[keep].max()
    pooled = np.abs(np.asarray(outputs["pooled_output"], np.float64) - reference["pooled_output"]).max()
    return float(seq), float(pooled)
