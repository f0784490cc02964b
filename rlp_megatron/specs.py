"""Megatron layer specs that run without Transformer Engine (CPU, or GPUs without TE).

``hybrid_local_stack_spec`` mirrors Megatron's TE ``hybrid_stack_spec`` (Mamba ``M``, attention
``*`` and MLP ``-`` layers of a ``--hybrid-layer-pattern``) with local modules:
Column/RowParallelLinear, local ``DotProductAttention`` and a pure-torch norm that follows
``config.normalization``.

Checkpoints stay interchangeable with the TE spec. TE fuses each pre-norm into the following linear
(``TELayerNormColumnParallelLinear``), so its keys read ``mixer.in_proj.layer_norm_weight`` where we
have ``norm.weight``; ``sharded_state_dict_keys_map`` renames ours to TE's in torch_dist
checkpoints.
The Mamba mixer itself needs mamba-ssm kernels or :mod:`rlp_megatron.backends.mamba_torch`.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

# Local module prefix -> the TE spec's fused-norm prefix.
MAMBA_TE_KEYS_MAP = {"norm.": "mixer.in_proj.layer_norm_"}
ATTENTION_TE_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
MLP_TE_KEYS_MAP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class LocalHybridStack(HybridStack):
    """HybridStack whose final norm is a torch norm; upstream hard-codes ``TENorm`` there."""

    def __init__(self, config, submodules, pre_process=True, layer_type_list=None,
                 pp_layer_offset=0, post_layer_norm=True, **kwargs):
        super().__init__(config, submodules, pre_process=pre_process,
                         layer_type_list=layer_type_list, pp_layer_offset=pp_layer_offset,
                         post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = WrappedTorchNorm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )


class _NotInLocalSpec:
    """Stands in for the layer types we do not provide; upstream's default IdentityOp would
    silently turn such layers into no-ops."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "hybrid_local_stack_spec provides Mamba (M), attention (*) and MLP (-) layers only"
        )


hybrid_local_stack_spec = ModuleSpec(
    module=LocalHybridStack,
    submodules=HybridStackSubmodules(
        mamba_layer=ModuleSpec(
            module=MambaLayer,
            submodules=MambaLayerSubmodules(
                norm=WrappedTorchNorm,
                mixer=ModuleSpec(
                    module=MambaMixer,
                    submodules=MambaMixerSubmodules(
                        in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                    ),
                ),
                mamba_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map=MAMBA_TE_KEYS_MAP,
            ),
        ),
        attention_layer=ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=WrappedTorchNorm,
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=ColumnParallelLinear,
                        core_attention=DotProductAttention,
                        linear_proj=RowParallelLinear,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map=ATTENTION_TE_KEYS_MAP,
            ),
        ),
        mlp_layer=ModuleSpec(
            module=MLPLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=WrappedTorchNorm,
                mlp=partial(
                    MLP.as_mlp_submodule,
                    submodules=MLPSubmodules(
                        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                    ),
                ),
                mlp_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map=MLP_TE_KEYS_MAP,
            ),
        ),
        gdn_layer=_NotInLocalSpec,
        dsa_layer=_NotInLocalSpec,
        mla_layer=_NotInLocalSpec,
        moe_layer=_NotInLocalSpec,
    ),
)
