"""``--objective`` and the ``--rlp-*`` argument group, and their startup validation.

Each flag maps to one name used everywhere else: ``--rlp-group-size`` ↔ ``args.rlp_group_size`` ↔
``RLPConfig.group_size`` ↔ metric ``rlp/group_size``. Validation runs right after Megatron's own
(``parse_and_validate_args``), before any model is built, and fails with one line naming the flag
and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math

from rlp_megatron.data import POSITIONS, PositionConfig
from rlp_megatron.objective import RLPObjectiveConfig

OBJECTIVES = ("ntp", "rlp", "rpt")  # --objective; rlp and rpt run the RLP step

_OBJECTIVE = RLPObjectiveConfig()


@dataclasses.dataclass(frozen=True)
class RLPConfig:
    """The RLP hyper-parameters; defaults are the paper's (rlp_spec §1.8). The objective's own
    four (and their validation) are :class:`rlp_megatron.objective.RLPObjectiveConfig`'s."""

    group_size: int = _OBJECTIVE.group_size
    thought_length: int = 2048
    context_length: int = 2048
    min_context: int = 32
    temperature: float = 0.7
    clip_eps_low: float = _OBJECTIVE.clip_eps_low
    clip_eps_high: float = _OBJECTIVE.clip_eps_high
    ema_decay: float = _OBJECTIVE.ema_decay
    unclosed: str = "score"
    rollout_micro_batch_size: int = 0
    logprobs: str = "fused"
    logprob_chunk_size: int = 1024
    seed: int = 1234
    positions: str = "uniform"
    positions_per_doc: int = 1
    entropy_top_fraction: float = 0.5
    entropy_threshold: float | None = None
    entropy_model: str = "policy"
    curriculum_iters: int = 1000
    curriculum_start: int = 0
    rpt_match_tokens: int = 1
    ntp_weight: float = 0.0
    objective: str = "rlp"  # --objective (rlp or rpt: the reward)

    @classmethod
    def from_args(cls, args) -> "RLPConfig":
        return cls(**{f.name: getattr(args, f.name if f.name == "objective" else f"rlp_{f.name}")
                      for f in dataclasses.fields(cls)})

    @property
    def position_config(self) -> PositionConfig:
        return PositionConfig(strategy=self.positions, per_doc=self.positions_per_doc,
                              top_fraction=self.entropy_top_fraction,
                              threshold=self.entropy_threshold,
                              curriculum_iters=self.curriculum_iters,
                              curriculum_start=self.curriculum_start,
                              entropy_model=self.entropy_model)

    @property
    def uses_teacher(self) -> bool:
        """RLP's reward needs the EMA teacher φ; RPT's does not (unless φ picks positions)."""
        return self.objective == "rlp"


def add_rlp_args(parser):
    g = parser.add_argument_group(title="rlp", description="RLP objective (arXiv 2510.01265)")
    g.add_argument("--objective", choices=OBJECTIVES, default="ntp",
                   help="Training objective: next-token prediction (Megatron's), RLP, or RPT "
                        "(Reinforcement Pre-Training, arXiv 2506.08007: reward 1 when the "
                        "tokens predicted after the thought match the text, else 0; same "
                        "rollout, layout and clipped surrogate as RLP, no EMA teacher).")
    d = RLPConfig()
    g.add_argument("--rlp-group-size", type=int, default=d.group_size,
                   help="G: thoughts sampled per context (≥ 2). --global-batch-size counts "
                        "thoughts (rows) and must be a multiple of G.")
    g.add_argument("--rlp-thought-length", type=int, default=d.thought_length,
                   help="Maximum thought tokens (the paper's completion length).")
    g.add_argument("--rlp-context-length", type=int, default=None,
                   help=f"Maximum context tokens before the sampled position (default "
                        f"{d.context_length}, lowered to what --seq-length leaves after the "
                        f"thought; an explicit value that does not fit is an error).")
    g.add_argument("--rlp-min-context", type=int, default=d.min_context,
                   help="Positions need at least this many same-document tokens before them.")
    g.add_argument("--rlp-temperature", type=float, default=d.temperature,
                   help="Sampling temperature of thoughts (> 0).")
    g.add_argument("--rlp-clip-eps-low", type=float, default=d.clip_eps_low,
                   help="PPO clip ε_low: ratio floor 1 − ε_low, in [0, 1).")
    g.add_argument("--rlp-clip-eps-high", type=float, default=d.clip_eps_high,
                   help="PPO clip ε_high: ratio ceiling 1 + ε_high, ≥ 0.")
    g.add_argument("--rlp-ema-decay", type=float, default=d.ema_decay,
                   help="τ of the EMA teacher φ ← τφ + (1−τ)θ, in [0, 1].")
    g.add_argument("--rlp-think-tokens", nargs=2, metavar=("OPEN", "CLOSE"), default=None,
                   help="Thought delimiters, each a single token of the tokenizer "
                        "(default '<think>' '</think>'; NullTokenizer: the two ids below eod).")
    g.add_argument("--rlp-prompt-file", type=str, default=None,
                   help="Text file prepended to every prompt (e.g. the paper's v2 prompt, "
                        "rlp_megatron.data.PAPER_PROMPT_V2). Off by default.")
    g.add_argument("--rlp-unclosed", choices=("score", "zero"), default=d.unclosed,
                   help="Thoughts that hit --rlp-thought-length without </think>: 'score' appends "
                        "</think> and scores x_t as usual; 'zero' gives them zero advantage and "
                        "leaves them out of their group's baseline.")
    g.add_argument("--rlp-rollout-micro-batch-size", type=int, default=d.rollout_micro_batch_size,
                   help="Rows decoded together (bounds KV-cache/Mamba-state memory); 0 = all "
                        "rows of a data-parallel rank at once.")
    g.add_argument("--rlp-logprobs", choices=("fused", "logits"), default=d.logprobs,
                   help="How RLP forwards get log-probs: 'fused' computes them from the final "
                        "hidden states and the output weight in fp32 without materialising "
                        "logits (rlp_megatron.kernels); 'logits' runs Megatron's output layer "
                        "(in fp32) and scores its vocab-parallel logits.")
    g.add_argument("--rlp-logprob-chunk-size", type=int, default=d.logprob_chunk_size,
                   help="Tokens per chunk of the fused log-prob kernel (bounds its fp32 "
                        "[chunk x vocab/TP] working set).")
    g.add_argument("--rlp-positions", choices=POSITIONS, default=d.positions,
                   help="Which positions of a window are trained: 'uniform' (RLP, the paper), "
                        "'entropy' (high next-token entropy, RPT's filter, arXiv 2506.08007) or "
                        "'curriculum' (an entropy band moving from easy to hard, Reinforcement "
                        "Mid-Training, arXiv 2509.24375). The entropies come from one forward "
                        "of the window per step.")
    g.add_argument("--rlp-positions-per-doc", type=int, default=d.positions_per_doc,
                   metavar="K",
                   help="Positions per window (document), each its own group of G thoughts; "
                        "the K·G rows of K consecutive groups share one window.")
    g.add_argument("--rlp-entropy-top-fraction", type=float, default=d.entropy_top_fraction,
                   help="'entropy': draw from this top fraction of the window's eligible "
                        "positions by entropy; 'curriculum': the width of the moving band.")
    g.add_argument("--rlp-entropy-threshold", type=float, default=d.entropy_threshold,
                   help="'entropy': draw from the positions whose entropy is at least this "
                        "many nats (instead of a top fraction).")
    g.add_argument("--rlp-entropy-model", choices=("policy", "teacher"),
                   default=d.entropy_model,
                   help="Whose next-token entropy selects positions: θ ('policy') or the EMA "
                        "teacher φ ('teacher', --objective rlp only).")
    g.add_argument("--rlp-curriculum-iters", type=int, default=d.curriculum_iters,
                   help="'curriculum': iterations over which the band moves from the lowest "
                        "entropies to the highest.")
    g.add_argument("--rlp-curriculum-start", type=int, default=d.curriculum_start,
                   help="'curriculum': the iteration at which the band is at the lowest "
                        "entropies (e.g. the iteration a run switched to RLP).")
    g.add_argument("--rlp-rpt-match-tokens", type=int, default=d.rpt_match_tokens,
                   help="--objective rpt: tokens predicted after </think>; the reward is 1 when "
                        "all of them equal the text's next tokens x_t, x_t+1, …, else 0.")
    g.add_argument("--rlp-ntp-weight", type=float, default=d.ntp_weight, metavar="LAMBDA",
                   help="Add LAMBDA × Megatron's next-token loss over each window's tokens "
                        "that are not a selected position (Reinforcement Mid-Training); "
                        "0 = the paper (no NTP term).")
    g.add_argument("--rlp-eval-interval", type=int, default=0, metavar="N",
                   help="Every N iterations (RLP and NTP runs), measure θ and φ on fixed "
                        "held-out positions of the validation split: rlp_eval/info_gain, "
                        "reasoned_nll, nothink_nll, thought_len, closed_frac (0 = off).")
    g.add_argument("--rlp-eval-positions", type=int, default=8, metavar="K",
                   help="Held-out positions per evaluation (the first K validation samples, "
                        "one position each, --rlp-group-size thoughts per position).")
    g.add_argument("--rlp-ntp-every", type=int, default=0, metavar="K",
                   help="In an RLP run, make every K-th iteration a next-token-prediction "
                        "iteration (0 = never). Each objective logs under its own keys.")
    g.add_argument("--rlp-ema-reinit", action="store_true",
                   help="Start the EMA teacher as φ ← θ even if the resumed checkpoint has an "
                        "EMA sidecar (also the way past an incomplete or mismatched sidecar).")
    g.add_argument("--rlp-max-skipped", type=int, default=10,
                   help="An RLP step whose rewards are not finite (NaN/Inf S_pred or S_EMA) is "
                        "skipped and counted (rlp/skipped_steps; no update, no EMA update); "
                        "this many consecutive skips stop the run.")
    g.add_argument("--rlp-seed", type=int, default=None,
                   help="Seed of positions and thought sampling (default: --seed).")
    g.add_argument("--rlp-metrics-file", type=str, default=None,
                   help="Append one JSON line of exact per-iteration metrics (both objectives).")
    g.add_argument("--rlp-dump-rollouts", type=str, default=None,
                   help="Directory: save each RLP step's rollout (thoughts, scores, advantages) "
                        "per data-parallel rank, for inspection and tests.")
    return parser


def _fail(msg: str):
    raise SystemExit(f"rlp_megatron: {msg}")


def validate_rlp_args(args) -> None:
    """Startup checks (before the model exists); exits with one line naming the flag."""
    if args.rlp_seed is None:
        args.rlp_seed = args.seed
    try:
        RLPObjectiveConfig(group_size=args.rlp_group_size, clip_eps_low=args.rlp_clip_eps_low,
                           clip_eps_high=args.rlp_clip_eps_high,
                           ema_decay=args.rlp_ema_decay).validate()
    except ValueError as exc:
        _fail(str(exc))
    for flag in ("thought_length", "context_length"):
        value = getattr(args, f"rlp_{flag}")
        if value is not None and value < 1:
            _fail(f"--rlp-{flag.replace('_', '-')} must be >= 1 (got {value})")
    if args.rlp_min_context < 1:
        _fail(f"--rlp-min-context must be >= 1 (got {args.rlp_min_context})")
    if args.rlp_max_skipped < 1:
        _fail(f"--rlp-max-skipped must be >= 1 (got {args.rlp_max_skipped})")
    if not args.rlp_temperature > 0:
        _fail(f"--rlp-temperature must be > 0 (got {args.rlp_temperature})")
    if args.rlp_ntp_every < 0 or args.rlp_ntp_every == 1:
        _fail(f"--rlp-ntp-every must be 0 (off) or >= 2 (got {args.rlp_ntp_every})")
    if args.rlp_logprob_chunk_size < 1:
        _fail(f"--rlp-logprob-chunk-size must be >= 1 (got {args.rlp_logprob_chunk_size})")
    if args.rlp_rollout_micro_batch_size < 0:
        _fail("--rlp-rollout-micro-batch-size must be >= 0 (0 = all rows at once)")
    _check_position_args(args)
    if args.rlp_eval_interval < 0 or args.rlp_eval_positions < 1:
        _fail(f"--rlp-eval-interval must be >= 0 and --rlp-eval-positions >= 1 (got "
              f"{args.rlp_eval_interval}, {args.rlp_eval_positions})")
    training = args.objective != "ntp"  # else only the in-loop evaluation samples thoughts
    if not training and not args.rlp_eval_interval:
        return
    block = args.rlp_group_size * args.rlp_positions_per_doc
    if training and args.global_batch_size % block != 0:
        per_doc = (f" × --rlp-positions-per-doc ({args.rlp_positions_per_doc})"
                   if args.rlp_positions_per_doc > 1 else "")
        _fail(f"--global-batch-size ({args.global_batch_size}) must be a multiple of "
              f"--rlp-group-size ({args.rlp_group_size}){per_doc}: it counts thoughts (rows)")
    prompt_len = _prompt_prefix_length(args)
    limit = min(args.seq_length, args.max_position_embeddings)
    if args.rlp_context_length is None:
        # prompt + context + <think> + thought + </think> + x_t must fit in seq_length + 1 tokens.
        room = limit - prompt_len - args.rlp_thought_length - 2
        args.rlp_context_length = min(RLPConfig.context_length, room)
        if args.rlp_context_length < 1:
            _fail(f"--rlp-thought-length ({args.rlp_thought_length}) leaves no room for a context "
                  f"in --seq-length/--max-position-embeddings ({limit})")
        if args.rlp_context_length < RLPConfig.context_length and getattr(args, "rank", 0) == 0:
            print(f"rlp_megatron: --rlp-context-length {args.rlp_context_length} (the most that "
                  f"--seq-length {limit} leaves after a {args.rlp_thought_length}-token thought)",
                  flush=True)
    need = prompt_len + args.rlp_context_length + 1 + args.rlp_thought_length + 1 + 1
    if args.objective == "rpt":
        need += args.rlp_rpt_match_tokens - 1  # x_t+1 … fed to predict the next ones
    if need - 1 > limit:
        _fail(f"--rlp-context-length ({args.rlp_context_length}) + --rlp-thought-length "
              f"({args.rlp_thought_length}) + 2 delimiters + target"
              f"{f' + {prompt_len} prompt tokens' if prompt_len else ''} = {need - 1} exceeds "
              f"--seq-length/--max-position-embeddings ({limit}); lower them or raise --seq-length")
    if training:
        _check_groups_stay_whole(args)
    _check_unsupported_features(args)
    for flag, name in (("context_parallel_size", "--context-parallel-size"),):
        if getattr(args, flag, 1) > 1:
            _fail(f"{name} > 1 is not supported with --objective rlp")
    if getattr(args, "sequence_parallel", False):
        _fail("--sequence-parallel is not supported with --objective rlp: rollouts decode one "
              "token per step through Megatron's inference path, which requires it off")
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        _fail("virtual pipeline stages (--num-layers-per-virtual-pipeline-stage) are not "
              "supported with --objective rlp")
    _check_think_tokens(args)
    dropout = (getattr(args, "hidden_dropout", 0.0), getattr(args, "attention_dropout", 0.0))
    if max(dropout) > 0 and getattr(args, "rank", 0) == 0:
        print(f"rlp_megatron: WARNING: --hidden-dropout {dropout[0]} / "
              f"--attention-dropout {dropout[1]}: rollouts sample without dropout (eval mode) "
              f"while the update's forward drops out, so the policy trained is not exactly the "
              f"one that sampled; RLP is normally run with dropout 0", flush=True)


def _check_position_args(args) -> None:
    if args.rlp_positions_per_doc < 1:
        _fail(f"--rlp-positions-per-doc must be >= 1 (got {args.rlp_positions_per_doc})")
    f = args.rlp_entropy_top_fraction
    if not (isinstance(f, float | int) and 0.0 < f <= 1.0):
        _fail(f"--rlp-entropy-top-fraction must be in (0, 1] (got {f})")
    h = args.rlp_entropy_threshold
    if h is not None and not math.isfinite(h):
        _fail(f"--rlp-entropy-threshold must be a finite number of nats (got {h})")
    if h is not None and args.rlp_positions != "entropy":
        _fail(f"--rlp-entropy-threshold applies to --rlp-positions entropy (got "
              f"--rlp-positions {args.rlp_positions}; the curriculum moves a top-fraction band)")
    if args.rlp_curriculum_iters < 1:
        _fail(f"--rlp-curriculum-iters must be >= 1 (got {args.rlp_curriculum_iters})")
    if args.rlp_entropy_model == "teacher" and args.objective == "rpt":
        _fail("--rlp-entropy-model teacher needs the EMA teacher of --objective rlp; "
              "--objective rpt has none")
    if args.rlp_rpt_match_tokens < 1:
        _fail(f"--rlp-rpt-match-tokens must be >= 1 (got {args.rlp_rpt_match_tokens})")
    w = args.rlp_ntp_weight
    if not (math.isfinite(w) and w >= 0):
        _fail(f"--rlp-ntp-weight must be a finite number >= 0 (got {w})")


def _check_groups_stay_whole(args) -> None:
    """Every group must be G consecutive sample indices inside one step (rlp_megatron.data).
    The step's rows are [consumed, consumed + global batch) of a sequential sampler; a start that
    is not a multiple of G is aligned when the checkpoint is loaded (train.align_consumed_samples);
    what no alignment can fix is refused here."""
    G = args.rlp_group_size * args.rlp_positions_per_doc
    if getattr(args, "dataloader_type", None) in ("cyclic", "external"):
        _fail(f"--dataloader-type {args.dataloader_type} is not supported with --objective rlp: "
              f"a group is {G} consecutive samples of one step, which only the sequential "
              f"('single') sampler keeps together")
    rampup = getattr(args, "rampup_batch_size", None)
    if rampup:
        start, increment = int(rampup[0]), int(rampup[1])
        if start % G or increment % G:
            _fail(f"--rampup-batch-size {' '.join(map(str, rampup))}: the start batch size and "
                  f"the increment must be multiples of --rlp-group-size × "
                  f"--rlp-positions-per-doc ({G}) so that no group is split between steps")


def _check_unsupported_features(args) -> None:
    """What the RLP step cannot honour today fails here, not in the middle of the first step."""
    impl = getattr(args, "cuda_graph_impl", "none")
    if impl not in (None, "none"):
        _fail(f"--cuda-graph-impl {impl} is not supported with --objective rlp: rollouts decode "
              f"through Megatron's static inference path, which raises at the first decode step "
              f"under CUDA graphs; use --cuda-graph-impl none")
    if getattr(args, "fp8", None) or getattr(args, "fp4", None):
        flag = "--fp8-format" if getattr(args, "fp8", None) else "--fp4-format"
        _fail(f"{flag} is not supported with --objective rlp: the rollout prefill feeds token "
              f"counts that are not multiples of 16, and the teacher forwards would "
              f"update the FP8 amax statistics; train RLP in bf16")
    if getattr(args, "expert_model_parallel_size", 1) > 1:
        _fail(f"--expert-model-parallel-size {args.expert_model_parallel_size} is not supported "
              f"with --objective rlp: data-parallel ranks run different numbers of rollout and "
              f"teacher forwards and would deadlock in the experts' all-to-all; use 1")
    if getattr(args, "mtp_num_layers", None):
        _fail(f"--mtp-num-layers {args.mtp_num_layers} is not supported with --objective rlp: "
              f"the RLP loss has no multi-token-prediction term")
    if getattr(args, "use_mup", False) and args.rlp_logprobs == "fused":
        _fail("--use-mup scales the logits inside Megatron's output path; use --rlp-logprobs "
              "logits with it")
    if getattr(args, "defer_embedding_wgrad_compute", False):
        _fail("--defer-embedding-wgrad-compute is not supported with --objective rlp: RLP "
              "computes the output layer in fp32 (exact rewards under bf16), outside the "
              "deferred bf16 weight-gradient buffers")


def _tokenizer(args):
    from megatron.training import get_tokenizer

    return get_tokenizer()


def _prompt_prefix_length(args) -> int:
    if not args.rlp_prompt_file:
        return 0
    from rlp_megatron.data import load_prompt_tokens

    try:
        return len(load_prompt_tokens(_tokenizer(args), args.rlp_prompt_file))
    except OSError as exc:
        _fail(f"--rlp-prompt-file: cannot read {args.rlp_prompt_file!r} ({exc.strerror})")
    except UnicodeDecodeError as exc:
        _fail(f"--rlp-prompt-file: {args.rlp_prompt_file!r} is not UTF-8 text ({exc.reason} at "
              f"byte {exc.start})")


def _check_think_tokens(args) -> None:
    from rlp_megatron.data import resolve_think_tokens

    try:
        resolve_think_tokens(_tokenizer(args), args.rlp_think_tokens)
    except ValueError as exc:
        _fail(str(exc))
