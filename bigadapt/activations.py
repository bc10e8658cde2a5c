"""Activation memory per rank: what autograd saves for backward, per block, from the model's shape.

Korthikanti et al. 2022 (eq. 1) give s*b*h*(34 + 5*a*s/h) bytes per layer for a GPT block with a fused GeLU,
dropout everywhere and eager attention. What a transformers block actually saves depends on its activation
function and MLP shape: GPT-2's default `gelu_new` is written out in plain torch ops and saves three more
ffn-wide tensors than a fused GeLU; a LLaMA block's SwiGLU keeps the gate, the activation and the up
projection; RMSNorm in half precision keeps an fp32 copy of its input. So the count here is in *units*, one
unit being one hidden-wide (or ffn-wide) activation-dtype tensor per token, with constants measured from
`torch.autograd.graph.saved_tensors_hooks` on one block of each architecture (tests/test_activations.py
repeats the measurement and compares; docs/accounting.md "Activations" has the table). Measured with every
weight trainable (full fine-tuning: a frozen linear keeps no input for a weight gradient, so adapter methods
save less and this stays an upper bound for them) and dropout 0.
"""
from __future__ import annotations

# ffn-wide tensors the activation function itself keeps for backward beyond its output, per token. Measured
# (transformers 5.23, torch 2.13, gpt2 / bert / llama blocks, fp32 and bf16): gelu (fused aten op) and silu keep
# their input; relu keeps only its output, which the next op keeps anyway; quick_gelu x*sigmoid(1.702x) keeps x
# and the sigmoid; gelu_new, 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))), keeps x, the tanh, 0.5*x and
# 1 + tanh. An activation not measured counts as gelu_new, the largest: an overestimate, never an under.
ACT_SAVED = {"gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "relu": 0, "quick_gelu": 2, "gelu_new": 4}
UNMEASURED_ACT = 4
# the rest of a block with LayerNorm (GPT-2, BERT, RoBERTa, OPT), hidden-wide tensors per token: both norms'
# inputs, the QKV projection's input and its output (q, k, v: 3), the attention output, the output projection's
# input and the MLP's first input. Measured 8.03 = (16.03 measured with gelu) - 2 ffn-wide (4h) tensors.
LAYERNORM_BLOCK = 8
# an RMSNorm block (LLaMA, Mistral, Qwen2, Gemma: gated MLP, rotary positions) keeps besides the above each
# norm's normalised input before its weight (+2), RoPE's cos and sin per token (2 * head_dim / h), and in
# half precision each norm's fp32 copy of its input (one more unit per norm). Measured with silu, h=256,
# 4 heads, ffn 688: fp32 10.52 and bf16 12.55 units besides the 4 ffn-wide tensors, predicted 10.5 and 12.5.
RMS_EXTRA = 2
# Eager attention keeps its softmax (a*s per token and layer, a*s/h units): measured +1.98 units at a*s/h = 2
# (GPT-2, BERT, LLaMA fp32); LLaMA in half precision computes the softmax in fp32 and casts it back: 3 units.
# SDPA (transformers' default) keeps one fp32 logsumexp per head and token instead (a/h units in fp32).
# The loss (objectives.loss_sum) peaks at three fp32 b*s*V tensors whatever the logits' dtype, measured with a
# traced allocation (tests/test_activations.py): in forward the fp32 logits (half-precision logits are upcast
# and the half copy dropped, the caller holding none), the causal shift's copy (`logits[:, :-1].reshape`
# copies a non-contiguous slice) and cross_entropy's log-softmax; in backward the saved log-softmax, its
# gradient and the slice's full-shape gradient. Was act_bytes + 8 per element: 2 bytes short in half precision.
LOSS_FP32_COPIES = 3


def ffn_width(c) -> int:
    h = c.hidden_size
    return getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "ffn_dim", None) \
        or 4 * h


def activation_name(c) -> str:
    act = getattr(c, "hidden_act", None) or getattr(c, "activation_function", None) \
        or getattr(c, "hidden_activation", None)
    return act if isinstance(act, str) else "gelu_new"


def is_rms(c) -> bool:
    """RMSNorm + gated MLP + rotary positions: the LLaMA family, which transformers configures with rms_norm_eps."""
    return hasattr(c, "rms_norm_eps")


def ffn_units(c) -> float:
    """ffn-wide tensors saved per token: the activation's own, plus the second projection's input (its output);
    a gated MLP (act(gate x) * up x) also keeps the up projection and the product."""
    own = ACT_SAVED.get(activation_name(c), UNMEASURED_ACT)
    return own + (3 if is_rms(c) else 1)


def block_units(c, act_bytes: int, attn: str, seq: int) -> float:
    """Saved bytes of one block per token, in units of hidden_size * act_bytes."""
    h, a = c.hidden_size, c.num_attention_heads
    units = LAYERNORM_BLOCK + ffn_units(c) * ffn_width(c) / h
    half = act_bytes < 4
    if is_rms(c):
        head_dim = getattr(c, "head_dim", None) or h // a
        units += RMS_EXTRA + 2 * head_dim / h + (2 if half else 0)
    if attn == "eager":
        units += a * seq / h * (3 if is_rms(c) and half else 1)
    else:
        units += a / h * 4 / act_bytes
    return units


def activations(shape, cfg, lay, attn: str, context: int, act_bytes: int) -> dict:
    """Activation bytes per rank for one micro-batch (an upper bound for adapter methods: see the docstring)."""
    c = shape.config
    h, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    virtual = cfg.method.l_p + cfg.method.l_i  # prefix methods lengthen every sequence
    s, b = min(lay.seq_len + virtual, context), lay.micro_batch
    per_layer = s * b * h * act_bytes * block_units(c, act_bytes, attn, s)
    # DoRA (methods/dora.py): each adapted module keeps one more [b, s, rows] tensor, W0 x + s B A x, for m's
    # gradient; its rows are its magnitude's length (spread over the layers)
    per_layer += s * b * act_bytes * sum(n for name, n, _, _ in shape.tensors
                                         if name.endswith("lora_magnitude_vector")) / L
    layers = L * per_layer
    if lay.activation_checkpointing:
        # a checkpointed block (0, k, 2k, ...) keeps only its input, the others everything. The peak is the end
        # of the forward, or the recompute of the last checkpointed block: the blocks above it are freed by then,
        # the uncheckpointed ones below it are still held, plus the one block being recomputed
        kept = len(range(0, L, lay.checkpoint_every))
        below = (kept - 1) * (lay.checkpoint_every - 1)
        layers = kept * s * b * h * act_bytes + max(L - kept, below + 1) * per_layer
    logits = s * b * V * LOSS_FP32_COPIES * 4
    return {"activations": int(layers), "logits": int(logits)}
