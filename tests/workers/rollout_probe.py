"""Run the RLP step's rollout and scoring phases on fixed prompts, with a model from flags.

    torchrun --nproc-per-node N tests/workers/rollout_probe.py OUT.pt MODE <Megatron flags>
        [--probe-load ITER_DIR] [--probe-rows ROWS.pt] [--probe-without-bf16-fixes]
        [--probe-scale-output 2^k] [--probe-logprobs fused|logits]

MODE ``rollout``: sample thoughts and score them (S_pred, thought log-probs, decode-time
log-probs), recording at every call of each attention core whether query, key and value are
dense tensors, at every call of the output layer the logits' dtype and their distance from an
fp32 product of the same inputs, and the dtypes of the Mamba decode states; ``score``: score
the thoughts of ROWS.pt (a ``rollout`` output) instead of sampling — an fp32 reference of the
same rows. RLP's log-prob paths are recorded per call: the output layer's (logits dtype, distance
from an fp32 product of its inputs) with ``--probe-logprobs logits``; with ``fused`` (the default)
each kernel call's inputs' dtype and its distance from a float64 computation on the same inputs.
``--probe-scale-output`` multiplies the output weight (exactly, by a power of two) so
that logits reach the magnitudes of a trained LM (16–32). ``--probe-without-bf16-fixes`` runs the same code with Megatron's bf16 logits and a
bf16 Mamba state (what the bf16 fixes replace), to measure what they change.
Test instrumentation only: the phases are RLPStep's own methods.
"""

import contextlib
import sys

import rlp_megatron  # noqa: F401
import torch
from megatron.core import dist_checkpointing, mpu
from megatron.training import get_tokenizer

from megatron_setup import build_model
from rlp_megatron import logprobs
from rlp_megatron.arguments import RLPConfig
from rlp_megatron.data import RLPSample, resolve_think_tokens
from rlp_megatron.rollout import generate as rollout_lib
from rlp_megatron.rollout import inference
from rlp_megatron.step import RLPStep, StepData

G = 2


def _option(argv, name, has_value=True):
    if name not in argv:
        return None
    i = argv.index(name)
    value = argv[i + 1] if has_value else True
    del argv[i : i + (2 if has_value else 1)]
    return value


def _samples(think, vocab_size, groups):
    gen = torch.Generator().manual_seed(7)
    samples = {}
    for g in range(groups):
        n = 6 + 3 * g  # different prompt lengths: prefill + prompt-tail decode steps
        context = torch.randint(0, vocab_size - 3, (n,), generator=gen).tolist()
        target = int(torch.randint(0, vocab_size - 3, (1,), generator=gen))
        samples[g] = RLPSample(group=g, prompt=[*context, think.open], target=target,
                               context=context)
    return samples


PHASE = ["setup"]


def _record_attention_inputs(model, log):
    for name, module in model.named_modules():
        if name.endswith("core_attention"):
            def hook(mod, args, kwargs, _name=name):
                q, k, v = (list(args) + [kwargs.get(x) for x in ("query", "key", "value")])[:3]
                log.append({"layer": _name, "phase": PHASE[0],
                            "shapes": [tuple(t.shape) for t in (q, k, v)],
                            "contiguous": [t.is_contiguous() for t in (q, k, v)]})
            module.register_forward_pre_hook(hook, with_kwargs=True)


def _record_output_layer(model, log):
    """Per output-layer call: the logits' dtype, their largest magnitude, and how far they are
    from hidden @ weight.T computed in fp32 from the same (bf16) inputs."""
    def hook(mod, args, kwargs, out):
        hidden = args[0]
        weight = kwargs.get("weight") if kwargs.get("weight") is not None else mod.weight
        logits = out[0].detach()
        exact = torch.matmul(hidden.detach().float(), weight.detach().float().t())
        log.append({"phase": PHASE[0], "dtype": str(logits.dtype),
                    "input_dtype": str(hidden.dtype),
                    "max_logit": logits.abs().max().item(),
                    "max_err": (logits.float() - exact).abs().max().item()})

    for layer in logprobs._output_layers(model):
        layer.register_forward_hook(hook, with_kwargs=True)


def _record_kernels(log):
    """Per fused log-prob call (update/scoring/teacher) and per decode-logits call: input dtypes,
    the largest |logit|, and the distance from float64 arithmetic on the same (bf16) inputs."""
    fused, last = logprobs.kernels.fused_linear_logprobs, logprobs.last_logits

    def fused_linear_logprobs(hidden, weight, targets, tp_group=None, **kw):
        out = fused(hidden, weight, targets, tp_group, **kw)
        z = (hidden.detach().double() @ weight.detach().double().T) / kw["temperature"]
        ids = torch.arange(z.shape[-1])
        z = z.masked_fill(ids >= kw["vocab_size"], float("-inf"))
        ref = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]
        log.append({"phase": PHASE[0], "kind": "fused", "input_dtype": str(hidden.dtype),
                    "weight_dtype": str(weight.dtype), "dtype": str(out.dtype),
                    "max_logit": z.masked_fill(z.isinf(), 0).abs().max().item() * kw["temperature"],
                    "max_err": (out.double() - ref).abs().max().item()})
        return out

    def last_logits(hidden, weight, vocab):
        out = last(hidden, weight, vocab)
        ref = vocab.mask_padding(hidden.double() @ weight.double().T)
        finite = ref.isfinite()
        log.append({"phase": PHASE[0], "kind": "decode", "input_dtype": str(hidden.dtype),
                    "weight_dtype": str(weight.dtype), "dtype": str(out.dtype),
                    "max_logit": ref[finite].abs().max().item(),
                    "max_err": (out.double() - ref)[finite].abs().max().item()})
        return out

    logprobs.kernels.fused_linear_logprobs = fused_linear_logprobs
    logprobs.last_logits = last_logits


def _record_decode_states(log):
    """dtypes of the Mamba conv/SSM states that the decode steps update."""
    original = inference.reindex_context

    def reindex_context(model, ctx, index):
        out = original(model, ctx, index)
        mixers = inference._mamba_mixers(model)
        for layer_number, (conv, ssm) in out.key_value_memory_dict.items():
            if layer_number in mixers:
                log.append({"conv": str(conv.dtype), "ssm": str(ssm.dtype)})
        return out

    inference.reindex_context = reindex_context


def _without_bf16_fixes():
    """Megatron's own numerics: bf16-rounded logits, Mamba SSM state in the params dtype."""
    logprobs.fp32_output_layer = lambda model: contextlib.nullcontext()
    original = inference.new_context

    def new_context(model, max_batch_size, max_sequence_length):
        ctx = original(model, max_batch_size, max_sequence_length)
        for k, (conv, ssm) in list(ctx.key_value_memory_dict.items()):
            ctx.key_value_memory_dict[k] = (conv, ssm.to(conv.dtype))
        return ctx

    inference.new_context = new_context


def main():
    out_path, mode, *argv = sys.argv[1:]
    load = _option(argv, "--probe-load")
    rows_path = _option(argv, "--probe-rows")
    scale_output = float(_option(argv, "--probe-scale-output") or 1.0)
    groups = int(_option(argv, "--probe-groups") or 3)
    path = _option(argv, "--probe-logprobs") or "fused"
    if _option(argv, "--probe-without-bf16-fixes", has_value=False):
        _without_bf16_fixes()
        path = "logits"
    args, model = build_model(argv)
    if load:
        module = model[0].module
        state = dist_checkpointing.load({"model": module.sharded_state_dict()}, load)
        module.load_state_dict(state["model"])
    if scale_output != 1.0:  # a power of two keeps bf16 weights exact: logits of a trained LM
        with torch.no_grad():
            for chunk in model:
                weight = logprobs.output_weight(chunk)
                if weight is not None:
                    weight.mul_(scale_output)
    tokenizer = get_tokenizer()
    think = resolve_think_tokens(tokenizer, None)
    cfg = RLPConfig(group_size=G, thought_length=12, context_length=32, min_context=1,
                    temperature=0.7, seed=11, logprobs=path)
    step = RLPStep(cfg, think, [], int(tokenizer.eod), args.seq_length, args.micro_batch_size,
                   False, vocab_size=int(tokenizer.vocab_size))
    samples = _samples(think, int(tokenizer.vocab_size), groups)
    work = [(samples[g], [g * G + i for i in range(G)]) for g in range(groups)]
    attention, head, states, kernel_calls = [], [], [], []
    _record_attention_inputs(model[0], attention)
    _record_output_layer(model, head)
    _record_decode_states(states)
    _record_kernels(kernel_calls)
    with logprobs.fp32_output_layer(model):
        if mode == "score":
            saved = torch.load(rows_path)
            rollout = rollout_lib.Rollout(rows=saved["rows"], groups=saved["groups"],
                                          thoughts=saved["thoughts"], closed=saved["closed"],
                                          behaviour_logprobs=saved["behaviour_logprobs"])
        else:
            PHASE[0] = "rollout"
            _, rollout = step.rollout(model, work, iteration=1)
        PHASE[0] = "score"
        data = StepData(samples=samples, rollout=rollout)
        step.layout(data)
        step.score(model, data)
    if mpu.get_tensor_model_parallel_rank() == 0 and mpu.is_pipeline_last_stage():
        torch.save({"attention": attention, "head": head, "states": states,
                    "kernels": kernel_calls,
                    "rows": rollout.rows, "groups": rollout.groups,
                    "thoughts": rollout.thoughts, "closed": rollout.closed,
                    "behaviour_logprobs": rollout.behaviour_logprobs,
                    "s_pred": data.s_pred, "old_logp": data.old_logp,
                    "thought_mask": data.thought_mask,
                    "max_logit": max((h["max_logit"] for h in head + kernel_calls),
                                     default=0.0)}, out_path)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
