"""Build a Megatron model (and optimizer) from command-line flags, as pretrain() does."""

import rlp_megatron  # noqa: F401  (CPU backend)
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.training import get_args
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.initialize import initialize_megatron
from megatron.training.training import setup_model_and_optimizer

from rlp_megatron import megatron_fixes, train


def build_model(flags):
    """(args, model chunks) after Megatron's own argument parsing, initialisation and setup."""
    train.parse_args(flags)
    megatron_fixes.install()
    initialize_megatron()
    args = get_args()
    cfg = pretrain_cfg_container_from_args(args, train.model_config_from_args(args))
    model, _, _ = setup_model_and_optimizer(
        ModelType.encoder_or_decoder, cfg_container=cfg,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return args, model
