#!/usr/bin/env python3
"""Per-GPU memory estimate for RLP on Nemotron-Nano-12B-v2 (8×H100-80GB nodes). Pure Python.

    python examples/nemotron_nano_12b_v2/memory_estimate.py            # table + recommendation
    python examples/nemotron_nano_12b_v2/memory_estimate.py --nodes 2 --seq-length 8192
    python examples/nemotron_nano_12b_v2/memory_estimate.py --only 4,1,1,128,none   # one layout

Everything here is an ESTIMATE from tensor shapes, not a measurement. Each term names the code it
models (megatron-core 0.19.2 and this repository). Units: GiB (2^30 bytes); an H100 80GB exposes
about 79.6 GiB, and we aim at <= 70 GiB so that allocator fragmentation and anything missed still fit.

What one GPU holds, all the time ("static"), with P = parameters on this GPU (TP/PP shard):
  weights     2 B·P   bf16 (--bf16)
  grads       4 B·P   fp32 main grads in the DDP buffer (bf16 forces accumulate_allreduce_grads_in_fp32,
                      megatron/training/arguments.py:1192)
  optimizer  12 B·P/DP  fp32 master copy + Adam m + v, sharded over DP (--use-distributed-optimizer)
  EMA         4 B·P   fp32 teacher φ, sharded like θ, replicated over DP (rlp_megatron/teacher.py)
  runtime     4 GiB   CUDA context, NCCL buffers, cuBLAS/TE workspaces (an assumption, not derived)

and, on top of that, the largest of the three phases of one RLP step (rollout → teacher → update;
they do not overlap in time; there is no scoring forward: S_pred comes from the rollout and the old
log-probs are the update's own, rlp_megatron/step.py):
  rollout   R rows decoded together (--rlp-rollout-micro-batch-size): KV cache of the 6 attention layers
            and the Mamba conv/SSM states of the 28 Mamba layers for R rows, a second copy of them
            (reindex_context rebuilds the cache when contexts expand into their G rows and when
            finished rows leave: old and new coexist during the copy), the no-grad prefill of the
            R / G distinct contexts (each group is generated whole by one DP rank), and the decode
            step's last-position logits + Gumbel-max buffers
            (rlp_megatron/rollout/generate.py). Summed although the prefill's working set is freed
            before the copy and the decode: an upper bound that also covers the caching allocator not
            reusing the prefill's blocks for the decode cache.
  teacher   φ swapped into the model: a bf16 backup of θ (2 B·P) + a no-grad forward of one micro-batch
            of contexts (rows trimmed to the longest context, <= --rlp-context-length tokens) + S_EMA
            at one position per row (step.score_teacher)
  update    activations of one micro-batch with grad, its rows trimmed to the step's longest row on this
            DP rank (worst case prompt + context + thought + 2 = 4098 tokens; --seq-length is only an
            upper bound and does not enter), + one layer's backward + the fused log-prob kernel
            (rlp_megatron/kernels/torch_logprobs.fused_linear_logprobs_torch, --rlp-logprobs fused)

All three RLP forwards use the fused log-prob path (--rlp-logprobs fused, the default): no
[tokens, V/TP] logits anywhere. --rlp-logprobs logits (Megatron's output layer in fp32) is not
modelled. NTP iterations (--rlp-ntp-every) are not modelled either.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

GiB = 2**30
HBM_GIB = 79.6  # H100 80GB HBM3 as the driver reports it (81,559 MiB)
TARGET_GIB = 70.0
RUNTIME_GIB = 4.0  # assumption: CUDA context + NCCL + workspaces
# The phase terms (prefill working set, activations) are the least certain: a layout is recommended
# only if it still fits the target with its largest phase 25% above the estimate ("hi" column).
PHASE_MARGIN = 1.25
# Fused log-prob kernel (rlp_megatron/kernels/torch_logprobs._FusedLinearLogprobs; the GPU runs
# this chunked PyTorch path too, there is no Triton fused-linear kernel): tokens in chunks of
# --rlp-logprob-chunk-size, the vocabulary shard in tiles of at most 16384 ids, fp32 [chunk, tile]
# temporaries. Forward, per tile: the fp32 GEMM output z and z / T (_tile_logits), then z / T,
# z − max and exp(z − max) (_Partial.add) → 3 tiles at once; it saves only the hidden states (a
# reference) and an fp32 [tokens] lse. Backward, per tile (_grad_logits): the recomputed GEMM
# output, z / T, z − lse and its exp (then −exp), while the previous tile's d is still bound → 5
# tiles at once; then d (1 tile) with the fp32 upcast of the bf16 weight tile [tile, H]
# (fp32_matmul(d, w): mixed dtypes take the .float() path) or the [tile, H] fp32 product d.T @ h,
# plus a [chunk, H] fp32 copy/product. Throughout the backward: the fp32 weight-grad accumulator
# [V/TP, H] and the fp32 hidden-grad [tokens, H], both cast to bf16 at the end while the fp32 ones
# (and the last d) are still alive. These counts were checked on CPU with an allocation tracker
# (a TorchDispatchMode, CUDA's no-copy bf16 GEMM emulated): peaks within 0.2% of logprob_bytes.
# The forward GEMM takes bf16 operands with an fp32 output (torch.mm(..., out_dtype=float32) on
# CUDA); where that call is unavailable it falls back to fp32 copies of the weight tile and the
# chunk, another 4·tile·H + 4·chunk·H bytes (320 MiB at H = 5120), not modelled.
LOGPROB_CHUNK = 1024  # --rlp-logprob-chunk-size default
VOCAB_TILE = 16384  # torch_logprobs._VOCAB_CHUNK
FWD_TILES = 3
BWD_TILES = 5
# Decoding (rlp_megatron/logprobs.last_logits, rollout/sampling.gumbel_max_sample): the last
# position's fp32 logits [rows, V/TP] (4 B/element; the prefill too, for its contexts), and while
# sampling four float64 [rows, V/TP] buffers at once (u and the Gumbel noise, logits.double() / T
# and the scores; uniform_noise's int64 hash temporaries peak at the same 32 B) → 36 B/element.
DECODE_BYTES_PER_ELEMENT = 4 + 4 * 8
MAMBA_CHUNK = 256  # chunk length of Mamba-2's chunked scan (mamba_ssm default)


@dataclasses.dataclass(frozen=True)
class Model:
    """Nemotron-Nano-12B-v2 (see README.md for the source of every number)."""

    pattern: str = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
    hidden: int = 5120
    ffn: int = 20480  # squared-ReLU MLP, no gate
    heads: int = 40
    kv_groups: int = 8
    kv_channels: int = 128
    vocab: int = 131072
    mamba_heads: int = 128
    mamba_head_dim: int = 80
    mamba_state: int = 128
    mamba_groups: int = 8
    mamba_conv: int = 4  # d_conv, Megatron's MambaMixer default

    @property
    def n_mamba(self):
        return self.pattern.count("M")

    @property
    def n_mlp(self):
        return self.pattern.count("-")

    @property
    def n_attn(self):
        return self.pattern.count("*")

    @property
    def d_inner(self):
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self):  # x, B, C go through the causal conv
        return self.d_inner + 2 * self.mamba_groups * self.mamba_state

    @property
    def d_in_proj(self):  # z, x, B, C, dt
        return 2 * self.d_inner + 2 * self.mamba_groups * self.mamba_state + self.mamba_heads

    # --- parameters of one layer: (TP-sharded, replicated over TP) -----------------------------
    def layer_params(self, kind: str) -> tuple[int, int]:
        h = self.hidden
        if kind == "M":
            sharded = (h * self.d_in_proj  # in_proj
                       + self.conv_dim * self.mamba_conv + self.conv_dim  # conv1d weight + bias
                       + 3 * self.mamba_heads  # A_log, D, dt_bias
                       + self.d_inner  # gated RMSNorm weight (grouped, TP-sharded)
                       + self.d_inner * h)  # out_proj
            return sharded, h  # pre-norm fused into in_proj
        if kind == "-":
            return 2 * h * self.ffn, h
        if kind == "*":
            q = self.heads * self.kv_channels
            kv = 2 * self.kv_groups * self.kv_channels
            return h * (q + kv) + q * h, h
        raise ValueError(kind)

    def total_params(self) -> int:
        layers = sum(sum(self.layer_params(c)) for c in self.pattern)
        return layers + 2 * self.vocab * self.hidden + self.hidden  # untied emb/output, final norm

    def params_on_gpu(self, tp: int, pp: int, stage: int) -> float:
        layers = self.stage_layers(pp, stage)
        p = sum(s / tp + r for s, r in map(self.layer_params, layers))
        if stage == 0:
            p += self.vocab * self.hidden / tp
        if stage == pp - 1:
            p += self.vocab * self.hidden / tp + self.hidden
        return p

    def stage_layers(self, pp: int, stage: int) -> str:
        per = len(self.pattern) / pp  # Megatron splits a pattern without '|' evenly by layer count
        return self.pattern[round(stage * per): round((stage + 1) * per)]

    # --- activations saved for backward, bytes per token, by layer kind ------------------------
    def saved_bytes_per_token(self, kind: str, tp: int, recompute: str) -> float:
        """No sequence parallelism (Megatron's static-batching Mamba path asserts it is off,
        megatron/core/ssm/mamba_mixer.py:491), so norm input/output are replicated over TP."""
        h = self.hidden
        if recompute == "full":
            return 2 * h  # only the checkpointed layer input
        replicated = 2 * h + 2 * h  # TE LayerNorm*Linear keeps the norm input and its output
        if kind == "M":
            # MambaMixer._ssm_training: mamba_split_conv1d_scan_combined (no fused norm/out_proj)
            # keeps zxBCdt and the pre-gate scan output, recomputing conv/scan intermediates in its
            # backward; then the gated RMSNorm keeps its input and out_proj keeps the norm output.
            return replicated + (2 * self.d_in_proj + 3 * 2 * self.d_inner) / tp
        if kind == "-":
            if recompute == "selective":  # --recompute-modules core_attn mlp: MLP input only
                return 2 * h
            return replicated + (2 * self.ffn + 2 * self.ffn) / tp  # fc1 out, fc2 in
        if kind == "*":
            q = self.heads * self.kv_channels
            kv = 2 * self.kv_groups * self.kv_channels
            # flash/fused attention keeps q, k, v, its output (= proj input) and the LSE (no s²).
            return replicated + (2 * q + 2 * kv + 2 * q) / tp
        raise ValueError(kind)

    def working_bytes_per_token(self, tp: int) -> float:
        """Peak per-token memory of a no-grad forward through the widest layer (prefill/teacher):
        residual in and out + norm output (replicated) + the layer's intermediates."""
        h = self.hidden
        mamba = (2 * self.d_in_proj + 2 * self.conv_dim + 2 * 2 * self.d_inner
                 + 4 * self.mamba_heads * self.mamba_head_dim * self.mamba_state / MAMBA_CHUNK) / tp
        mlp = 2 * 2 * self.ffn / tp
        attn = 4 * (self.heads + 2 * self.kv_groups) * self.kv_channels / tp
        return 6 * h + max(mamba, mlp, attn)

    # --- inference cache per decoded row --------------------------------------------------------
    def kv_bytes_per_token(self, tp: int) -> float:
        return self.n_attn * 2 * (self.kv_groups / tp) * self.kv_channels * 2  # bf16 K and V

    def mamba_state_bytes(self, tp: int) -> float:
        """conv state [conv_dim/TP, d_conv] in the weights' dtype (bf16, 2 B) + SSM state
        [heads/TP, head_dim, d_state] in fp32 (4 B), per layer: rlp_megatron/rollout/inference.
        new_context allocates the SSM state in fp32 whatever the parameters' dtype."""
        conv = self.conv_dim / tp * self.mamba_conv
        ssm = self.mamba_heads / tp * self.mamba_head_dim * self.mamba_state
        return self.n_mamba * (2 * conv + 4 * ssm)

    # --- fused log-prob kernel (see FWD_TILES / BWD_TILES) ------------------------------------
    def logprob_bytes(self, tokens: int, tp: int, mbs: int, grad: bool,
                      chunk: int = LOGPROB_CHUNK) -> float:
        """Peak of fused_linear_logprobs over `tokens` positions of this TP rank's vocab shard;
        with `grad`, the larger of its forward and its backward (the backward runs first in the
        model's backward, with every activation still alive)."""
        h, v = self.hidden, self.vocab / tp
        c, t = min(chunk, tokens), min(VOCAB_TILE, v)
        tile = 4 * c * t
        # hidden.reshape(-1, H) of the [b, s, H] transposed view copies it when b > 1
        reshape = 2 * tokens * h if mbs > 1 else 0
        fwd = FWD_TILES * tile + reshape
        if not grad:
            return fwd
        accumulators = 4 * v * h + 4 * tokens * h  # fp32 grad of the weight shard and of hidden
        bwd = accumulators + reshape + max(
            BWD_TILES * tile,  # _grad_logits
            tile + 4 * t * h + 4 * c * h,  # d, fp32 [tile, H] upcast / product, [chunk, H]
            tile + 2 * v * h + 2 * tokens * h)  # the last d + the final .to(bf16) casts
        return max(fwd, bwd)


@dataclasses.dataclass(frozen=True)
class Job:
    nodes: int = 4  # the paper's 32 H100s
    gpus_per_node: int = 8
    group_size: int = 16
    thought_length: int = 2048
    context_length: int = 2048
    prompt_tokens: int = 0  # --rlp-prompt-file length
    # >= prompt + context + thought + 2 = 4098, rounded up to 128. Only an upper bound: the update's
    # and the teacher's rows are trimmed to the step's longest row, so it does not enter the estimate.
    seq_length: int = 4224
    global_batch_size: int = 8192  # rows (thoughts): the paper's 512 contexts × G=16

    @property
    def max_row_tokens(self):  # [p] context <think> thought </think> (x_t is only a label)
        return self.prompt_tokens + self.context_length + 1 + self.thought_length + 1

    @property
    def update_tokens(self):
        """Width of the update's rows: the step's longest row on a DP rank. At the paper's batch a
        rank holds 1024 rows, so one thought hitting the cap after a full context is likely: the
        worst case is assumed."""
        return self.max_row_tokens

    @property
    def teacher_tokens(self):  # the teacher's rows: context only (no prompt, no <think>)
        return self.context_length


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    mbs: int
    rollout_rows: int  # 0 = every row of the data-parallel rank at once
    recompute: str  # none | selective | full

    def flags(self) -> str:
        f = (f"--tensor-model-parallel-size {self.tp} --pipeline-model-parallel-size {self.pp} "
             f"--micro-batch-size {self.mbs} --rlp-rollout-micro-batch-size {self.rollout_rows}")
        if self.recompute == "selective":
            f += " --recompute-granularity selective --recompute-modules core_attn mlp"
        elif self.recompute == "full":
            f += " --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
        return f


def estimate(m: Model, job: Job, lay: Layout) -> dict:
    world = job.nodes * job.gpus_per_node
    dp = world // (lay.tp * lay.pp)
    rows_per_rank = job.global_batch_size // dp
    rows = rows_per_rank if lay.rollout_rows == 0 else min(lay.rollout_rows, rows_per_rank)
    S, tp = job.update_tokens, lay.tp
    v_local = m.vocab / tp

    worst = None
    for stage in range(lay.pp):
        P = m.params_on_gpu(tp, lay.pp, stage)
        layers = m.stage_layers(lay.pp, stage)
        last = stage == lay.pp - 1
        static = dict(weights=2 * P, grads=4 * P, optimizer=12 * P / dp, ema=4 * P,
                      runtime=RUNTIME_GIB * GiB)

        # update: 1F1B keeps (pp - stage) micro-batches in flight on a stage
        in_flight = lay.pp - stage
        per_tok = sum(m.saved_bytes_per_token(c, tp, lay.recompute) for c in layers)
        per_tok += 2 * m.hidden * (1 + 2 * last)  # embedding out / final norm in+out
        widest = max(m.saved_bytes_per_token(c, tp, "none") for c in set(layers))
        act = in_flight * lay.mbs * S * per_tok
        backward_ws = lay.mbs * S * widest  # one layer's grads (or its recomputed activations)
        # S_pred's one position per row runs under no_grad after the labels' pass: negligible.
        logp = m.logprob_bytes(lay.mbs * S, tp, lay.mbs, grad=True) if last else 0
        update = act + backward_ws + logp

        teacher_ws = lay.mbs * job.teacher_tokens * m.working_bytes_per_token(tp)
        s_ema = m.logprob_bytes(lay.mbs, tp, 1, grad=False) if last else 0  # [mbs, H] @ [H, V/TP]
        teacher = 2 * P + teacher_ws + s_ema

        # rollout: each group is generated whole by one DP rank (rlp_megatron/rollout/placement.py),
        # so a batch of `rows` holds rows / G distinct contexts.
        contexts = math.ceil(rows / job.group_size)
        cache_len = job.max_row_tokens
        kv = rows * cache_len * m.kv_bytes_per_token(tp) * len(
            [c for c in layers if c == "*"]) / max(1, m.n_attn)
        ssm = rows * m.mamba_state_bytes(tp) * len([c for c in layers if c == "M"]) / max(1, m.n_mamba)
        # reindex_context rebuilds the cache when contexts expand into their G rows and when
        # finished rows are dropped; old and new exist until the copy is done: at worst a second
        # full cache.
        replicate = kv + ssm
        prefill = contexts * (job.prompt_tokens + job.context_length + 1) * m.working_bytes_per_token(tp)
        # last stage: the decode step's fp32 last-position logits + Gumbel-max float64 buffers
        decode = DECODE_BYTES_PER_ELEMENT * rows * v_local if last else 0
        rollout = kv + ssm + replicate + prefill + decode

        phases = dict(rollout=rollout, teacher=teacher, update=update)
        peak_phase = max(phases, key=phases.get)
        total = sum(static.values()) + phases[peak_phase]
        total_hi = sum(static.values()) + PHASE_MARGIN * phases[peak_phase]
        row = dict(stage=stage, dp=dp, P=P, static=static, phases=phases, peak_phase=peak_phase,
                   total=total, total_hi=total_hi, act=act, backward_ws=backward_ws, logp=logp,
                   kv=kv, ssm=ssm, replicate=replicate, prefill=prefill, decode=decode,
                   teacher_ws=teacher_ws, contexts=contexts, rows=rows, rows_per_rank=rows_per_rank)
        if worst is None or total > worst["total"]:
            worst = row
    worst["fits"] = worst["total"] / GiB <= TARGET_GIB
    worst["fits_hi"] = worst["total_hi"] / GiB <= TARGET_GIB
    return worst


CANDIDATES = [
    Layout(8, 1, 1, 256, "none"),
    Layout(8, 1, 2, 256, "none"),
    Layout(8, 1, 4, 256, "selective"),
    Layout(4, 1, 1, 0, "none"),
    Layout(4, 1, 1, 256, "none"),
    Layout(4, 1, 1, 128, "none"),
    Layout(4, 1, 2, 128, "none"),
    Layout(4, 1, 2, 128, "selective"),
    Layout(4, 1, 4, 128, "full"),
    Layout(2, 1, 1, 64, "full"),
    Layout(4, 2, 1, 128, "none"),
]

_RECOMPUTE_COST = {"none": 0, "selective": 1, "full": 2}


def recommend(rows: list[tuple[Layout, dict]]) -> tuple[Layout, dict]:
    """Among layouts that fit the target even with the phase term 25% higher: PP=1 (rollouts
    decode stage by stage, so with PP>1 each decode step waits on every stage in turn); the
    smallest TP (fewer per-layer all-reduces, bigger GEMMs); no recompute over selective over full
    (compute); the larger rollout batch (weight reads amortised over more rows); the smaller
    micro-batch (one row is already a >4k-token GEMM, a second one buys little)."""
    ok = [(lay, e) for lay, e in rows if e["fits_hi"] and lay.rollout_rows > 0]
    return min(ok, key=lambda le: (le[0].pp, le[0].tp, _RECOMPUTE_COST[le[0].recompute],
                                   -le[0].rollout_rows, le[0].mbs))


def gib(x: float) -> str:
    return f"{x / GiB:5.1f}"


def print_table(m: Model, job: Job, layouts: list[Layout]) -> list[tuple[Layout, dict]]:
    rows = [(lay, estimate(m, job, lay)) for lay in layouts]
    print(f"Nemotron-Nano-12B-v2: {m.total_params() / 1e9:.2f}B parameters; pattern "
          f"{len(m.pattern)} layers = {m.n_mamba} Mamba + {m.n_mlp} MLP + {m.n_attn} attention")
    print(f"job: {job.nodes} nodes × {job.gpus_per_node} GPUs, G={job.group_size}, thought "
          f"{job.thought_length}, context {job.context_length}, --seq-length {job.seq_length}, "
          f"--global-batch-size {job.global_batch_size} rows")
    print(f"update rows: the step's longest row, worst case {job.update_tokens} tokens "
          f"(not --seq-length); teacher rows: <= {job.teacher_tokens} context tokens")
    print(f"per row in the rollout cache (TP=1): KV {m.kv_bytes_per_token(1) / 1024:.0f} KiB/token "
          f"× {job.max_row_tokens} tokens = {m.kv_bytes_per_token(1) * job.max_row_tokens / 2**20:.0f} MiB, "
          f"Mamba state {m.mamba_state_bytes(1) / 2**20:.1f} MiB (SSM fp32; both ÷ TP)")
    print("GiB per GPU (estimates). static = weights + grads + optimizer + EMA + runtime; "
          "total = static + the largest phase.")
    head = (f"{'TP':>2} {'PP':>2} {'DP':>3} {'mbs':>3} {'rows':>5} {'recompute':>9} | {'wts':>5} {'grad':>5} "
            f"{'optim':>5} {'EMA':>5} {'static':>6} | {'rollout':>7} {'teach':>5} "
            f"{'update':>6} | {'total':>5} {'hi':>5}  note")
    print(head)
    print("-" * len(head))
    for lay, e in rows:
        s, p = e["static"], e["phases"]
        rows_txt = f"{e['rows']}" + ("*" if lay.rollout_rows == 0 else "")
        note = []
        if lay.pp > 1:
            note.append("worst stage; decode runs stage by stage")
        if e["fits_hi"]:
            note.append("fits")
        elif e["fits"]:
            note.append("fits, not at +25%")
        else:
            note.append("OVER 80 GB" if e["total"] / GiB > HBM_GIB else "over target")
        note.append(f"peak={e['peak_phase']}")
        print(f"{lay.tp:>2} {lay.pp:>2} {e['dp']:>3} {lay.mbs:>3} {rows_txt:>5} {lay.recompute:>9} | "
              f"{gib(s['weights'])} {gib(s['grads'])} {gib(s['optimizer'])} {gib(s['ema'])} "
              f"{gib(sum(s.values())):>6} | {gib(p['rollout']):>7} "
              f"{gib(p['teacher'])} {gib(p['update']):>6} | {gib(e['total'])} {gib(e['total_hi'])}  "
              f"{', '.join(note)}")
    print("rows* = every row of the data-parallel rank decoded at once (--rlp-rollout-micro-batch-size 0); "
          f"hi = static + {PHASE_MARGIN:g} × the largest phase.")
    return rows


def breakdown(m: Model, job: Job, lay: Layout, e: dict) -> None:
    print(f"\nbreakdown, {lay.flags()}:")
    print(f"  parameters on this GPU     {e['P'] / 1e9:.3f}B  (DP={e['dp']}, {e['rows_per_rank']} rows per rank per step)")
    for k, v in e["static"].items():
        print(f"  {k:<26} {gib(v)}")
    print(f"  rollout: KV cache          {gib(e['kv'])}  ({e['rows']} rows × {job.max_row_tokens} tokens)")
    print(f"  rollout: Mamba states      {gib(e['ssm'])}  (conv bf16, SSM fp32)")
    print(f"  rollout: cache rebuild     {gib(e['replicate'])}  "
          f"(a second KV + Mamba state copy while rows join or leave the batch)")
    print(f"  rollout: prefill           {gib(e['prefill'])}  ({e['contexts']} distinct contexts × "
          f"{job.prompt_tokens + job.context_length + 1} tokens, no grad)")
    print(f"  rollout: logits + sampling {gib(e['decode'])}  ({DECODE_BYTES_PER_ELEMENT} B × "
          f"{e['rows']} rows × V/TP: fp32 last-position logits + float64 Gumbel-max buffers)")
    print(f"  teacher: forward           {gib(e['teacher_ws'])}  (mbs {lay.mbs} × {job.teacher_tokens} "
          f"context tokens, no grad; + the bf16 backup of θ)")
    print(f"  update: activations        {gib(e['act'])}  (mbs {lay.mbs} × {job.update_tokens} tokens, "
          f"recompute {lay.recompute})")
    print(f"  update: one layer backward {gib(e['backward_ws'])}")
    print(f"  update: fused log-probs    {gib(e['logp'])}  (backward: fp32 [V/TP, H] and [tokens, H] "
          f"grad accumulators + fp32 [{LOGPROB_CHUNK} × {VOCAB_TILE}] tiles)")
    print(f"  peak phase                 {e['peak_phase']}: total {gib(e['total'])} of {HBM_GIB} "
          f"(target <= {TARGET_GIB:.0f}, headroom {TARGET_GIB - e['total'] / GiB:.1f}; "
          f"with the phase +{PHASE_MARGIN - 1:.0%}: {gib(e['total_hi']).strip()})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=Job.nodes)
    ap.add_argument("--seq-length", type=int, default=Job.seq_length)
    ap.add_argument("--global-batch-size", type=int, default=Job.global_batch_size)
    ap.add_argument("--group-size", type=int, default=Job.group_size)
    ap.add_argument("--thought-length", type=int, default=Job.thought_length)
    ap.add_argument("--context-length", type=int, default=Job.context_length)
    ap.add_argument("--prompt-tokens", type=int, default=Job.prompt_tokens)
    ap.add_argument("--only", metavar="TP,PP,MBS,ROWS,RECOMPUTE",
                    help="estimate one layout (rows 0 = all rows of a rank) instead of the table")
    a = ap.parse_args(argv)
    m = Model()
    assert (len(m.pattern), m.n_mamba, m.n_mlp, m.n_attn) == (62, 28, 28, 6), "pattern shape"
    job = Job(nodes=a.nodes, seq_length=a.seq_length, global_batch_size=a.global_batch_size,
              group_size=a.group_size, thought_length=a.thought_length,
              context_length=a.context_length, prompt_tokens=a.prompt_tokens)
    need = job.max_row_tokens
    if need > job.seq_length:
        ap.error(f"--seq-length {job.seq_length} < {need} tokens per row (prompt + context + thought + 2)")
    if a.only:
        tp, pp, mbs, r, rc = a.only.split(",")
        lay = Layout(int(tp), int(pp), int(mbs), int(r), rc)
        print_table(m, job, [lay])
        breakdown(m, job, lay, estimate(m, job, lay))
        return
    layouts = [lay for lay in CANDIDATES
               if (job.nodes * job.gpus_per_node) % (lay.tp * lay.pp) == 0]
    rows = print_table(m, job, layouts)
    try:
        lay, e = recommend(rows)
    except ValueError:
        print("\nno candidate fits the target; use more nodes or a shorter thought/context")
        return
    print(f"\nrecommended: TP={lay.tp} PP={lay.pp} micro-batch {lay.mbs}, rollout micro-batch "
          f"{lay.rollout_rows} rows, recompute {lay.recompute}")
    breakdown(m, job, lay, e)


if __name__ == "__main__":
    main()
