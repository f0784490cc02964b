"""The `--objective` flag and the `--rlp-*` argument group (placeholder, filled in by the RLP step)."""


def add_rlp_args(parser):
    group = parser.add_argument_group(title="rlp")
    group.add_argument("--objective", choices=("ntp", "rlp"), default="ntp",
                       help="Training objective: next-token prediction or RLP.")
    return parser


def validate_rlp_args(args):
    pass
