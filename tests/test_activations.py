"""The activation model (bigadapt/activations.py) against what autograd really saves for one block.

The reference is independent of the model: `torch.autograd.graph.saved_tensors_hooks` sees every tensor an op
keeps for backward; the bytes of their distinct storages, parameters left out, are the block's activations.
"""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from transformers import AutoConfig, AutoModel

from bigadapt import activations

S, B = 64, 2
ARCHS = {  # dropout 0, as the constants were measured
    "gpt2": dict(n_layer=1, n_embd=128, n_head=4, vocab_size=64, n_positions=128, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new"),
    "bert": dict(num_hidden_layers=1, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                 vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="gelu"),
    "llama": dict(num_hidden_layers=1, hidden_size=128, num_attention_heads=4, intermediate_size=344,
                  vocab_size=64, hidden_act="silu"),
}


def saved_bytes(model, block_call) -> int:
    """Bytes of the distinct storages autograd keeps for backward during `block_call()`, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        block_call()
    return sum(kept.values())


def one_block(model_type: str, dtype, attn: str, **overrides):
    config = AutoConfig.for_model(model_type, **dict(ARCHS[model_type], **overrides))
    model = AutoModel.from_config(config, attn_implementation=attn).to(dtype).train()  # every weight trainable
    x = torch.randn(B, S, config.hidden_size, dtype=dtype, requires_grad=True)
    if model_type == "llama":
        positions = torch.arange(S).expand(B, S)
        rope = model.rotary_emb(x, positions)
        return model, config, lambda: model.layers[0](x, position_embeddings=rope, position_ids=positions)
    block = model.h[0] if model_type == "gpt2" else model.encoder.layer[0]
    return model, config, lambda: block(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_predicted_block_bytes_match_what_autograd_saves(model_type, attn, dtype):
    model, config, call = one_block(model_type, dtype, attn)
    act_bytes = dtype.itemsize
    predicted = S * B * config.hidden_size * act_bytes * activations.block_units(config, act_bytes, attn, S)
    measured = saved_bytes(model, call)
    assert predicted == pytest.approx(measured, rel=0.10), (model_type, attn, dtype, predicted, measured)


def test_gelu_new_saves_three_more_ffn_tensors_than_the_fused_gelu():
    """The GPT-2 finding behind the model: the same block with gelu (one fused op) saves 3 x ffn fewer units."""
    fused, written_out = (one_block("gpt2", torch.float32, "sdpa", activation_function=act)
                          for act in ("gelu", "gelu_new"))
    diff = saved_bytes(*written_out[::2]) - saved_bytes(*fused[::2])
    assert diff == 3 * S * B * 4 * 128 * 4
    assert activations.ffn_units(written_out[1]) - activations.ffn_units(fused[1]) == 3


def test_unmeasured_activation_counts_as_the_largest():
    config = AutoConfig.for_model("gpt2", **dict(ARCHS["gpt2"], activation_function="mish"))
    assert activations.ffn_units(config) == max(activations.ACT_SAVED.values()) + 1


def traced_peak(fn) -> int:
    """Most bytes the CPU allocator held at once during `fn()` above what it held before, from the profiler's
    allocation trace (every alloc and free, all threads, in time order)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_peak_is_three_fp32_logit_copies(dtype):
    """The logits term against the allocation trace of the loss as the loop runs it (the frozen head's output
    handed straight to objectives.loss_sum, forward then backward): three fp32 b*s*V tensors at the peak in
    either dtype, the shifted ones one position shorter, plus the b*s*h input gradient."""
    from bigadapt import objectives
    b, s, h, vocab = 2, 16, 8, 3000
    x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(h, vocab, bias=False).to(dtype).requires_grad_(False)
    labels = torch.randint(0, vocab, (b, s))
    box = {}
    forward = traced_peak(lambda: box.update(loss=objectives.loss_sum(head(x), labels, "causal_lm")))
    held = 4 * b * (s - 1) * vocab  # the saved log-softmax
    backward = held + traced_peak(lambda: box["loss"].backward())
    predicted = activations.LOSS_FP32_COPIES * 4 * b * s * vocab
    assert max(forward, backward) <= predicted < max(forward, backward) * 1.08
