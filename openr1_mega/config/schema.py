"""Config dataclasses, one per section of a recipe YAML, plus the model architecture.

Sections a recipe writes (strictly validated by `config.load`):
  model      ModelConfig       which checkpoint to start from and how to build it
  parallel   ParallelConfig    TP / PP / EP / expert-TP / CP sizes, sequence parallel
  precision  PrecisionConfig   parameter dtype and FP8

Derived, never written by hand:
  ArchConfig (+ MoEArch)       the transformer's shape, read from a Hugging Face config.json
                               by `models.archs`; `config.to_megatron` turns it (with the
                               sections above) into Megatron's TransformerConfig.

Every field has a docstring-style comment; `__post_init__` rejects bad values and names
the field. Later issues add their own sections (sft, grpo, ...) here, one dataclass each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("auto", "te", "sdpa")
DISPATCHERS = ("auto", "allgather", "alltoall")
RECOMPUTE = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name}={value!r}: expected one of {list(choices)}")


def _check_positive(section: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{section}.{name}={value!r}: expected a positive integer")


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """The `model:` section: which checkpoint, and the build choices that are ours to make."""

    path: str = ""
    """Hugging Face model directory (config.json + safetensors + tokenizer). A Megatron
    checkpoint is exported to one first (`tools/convert_checkpoint.py mcore-to-hf`); a run
    resumes from its own dist-checkpoints with `--resume`."""
    attention_backend: str = "auto"
    """auto: Transformer Engine when it imports, else SDPA; te: require TE; sdpa: our
    torch scaled_dot_product_attention core attention."""
    moe_token_dispatcher: str = "auto"
    """auto: alltoall on CUDA, allgather on CPU (alltoall needs CUDA streams)."""
    moe_aux_loss_coeff: float | None = None
    """Load-balancing loss weight; None takes `router_aux_loss_coef` from the HF config."""
    recompute: str = "none"
    """Activation recomputation: none, selective (core attention) or full (every layer)."""

    def __post_init__(self) -> None:
        _check_choice("model", "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("model", "moe_token_dispatcher", self.moe_token_dispatcher, DISPATCHERS)
        _check_choice("model", "recompute", self.recompute, RECOMPUTE)
        if self.moe_aux_loss_coeff is not None and self.moe_aux_loss_coeff < 0:
            raise ValueError(f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff}: must be >= 0")


# -------------------------------------------------------------------------- parallel
@dataclass
class ParallelConfig:
    """The `parallel:` section. Data parallelism takes whatever ranks are left."""

    tp: int = 1
    """Tensor-parallel size (attention heads, MLP and vocab split across ranks)."""
    pp: int = 1
    """Pipeline-parallel size (layers split into consecutive stages)."""
    ep: int = 1
    """Expert-parallel size (MoE experts split across ranks)."""
    etp: int | None = None
    """Expert tensor-parallel size; None means equal to `tp` (Megatron's default)."""
    cp: int = 1
    """Context-parallel size (sequence split across ranks; needs Transformer Engine)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (needs tp > 1)."""
    pp_first_stage_layers: int | None = None
    """Layers on the first pipeline stage (Megatron's num_layers_in_first_pipeline_stage);
    None: an even share. The embedding lives there too, so it often takes fewer."""
    pp_last_stage_layers: int | None = None
    """Layers on the last pipeline stage (num_layers_in_last_pipeline_stage); None: an even
    share. The middle stages split the remaining layers evenly."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            _check_positive("parallel", name, getattr(self, name))
        for name in ("etp", "pp_first_stage_layers", "pp_last_stage_layers"):
            if getattr(self, name) is not None:
                _check_positive("parallel", name, getattr(self, name))
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=True needs parallel.tp > 1")
        if self.pp == 1 and self.uneven_pipeline:
            raise ValueError("parallel.pp_first_stage_layers / parallel.pp_last_stage_layers "
                             "need parallel.pp > 1")

    @property
    def uneven_pipeline(self) -> bool:
        """Whether the first or last pipeline stage has a layer count of its own."""
        return self.pp_first_stage_layers is not None or self.pp_last_stage_layers is not None

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size actually used."""
        return self.tp if self.etp is None else self.etp

    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the dense part of the model (TP x PP x CP)."""
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for `world_size` ranks; raises if the layout does not divide the world."""
        mp = self.model_parallel_size()
        if world_size % mp:
            raise ValueError(f"world size {world_size} is not divisible by parallel.tp*pp*cp="
                             f"{self.tp}*{self.pp}*{self.cp}={mp}")
        dp = world_size // mp
        if (dp * self.cp * self.tp) % (self.ep * self.expert_tp):
            raise ValueError(
                f"parallel.ep*etp={self.ep}*{self.expert_tp}={self.ep * self.expert_tp} must "
                f"divide world size / parallel.pp = {world_size // self.pp} (Megatron's expert "
                f"groups; world size {world_size})")
        return dp


# ------------------------------------------------------------------------- precision
@dataclass
class PrecisionConfig:
    """The `precision:` section."""

    dtype: str = "bf16"
    """Parameter and activation dtype: fp32, bf16 or fp16."""
    fp8: str | None = None
    """FP8 format for Transformer Engine layers (e4m3 or hybrid); None disables FP8."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: delayed, tensorwise, mxfp8 or blockwise."""

    def __post_init__(self) -> None:
        _check_choice("precision", "dtype", self.dtype, DTYPES)
        if self.fp8 is not None:
            _check_choice("precision", "fp8", self.fp8, FP8_FORMATS)
        _check_choice("precision", "fp8_recipe", self.fp8_recipe, FP8_RECIPES)


# ---------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class MoEArch:
    """Mixture-of-experts part of an architecture (read from the HF config)."""

    num_experts: int
    """Routed experts per MoE layer."""
    topk: int
    """Experts each token is routed to."""
    ffn_hidden_size: int
    """Intermediate size of one routed expert."""
    norm_topk_prob: bool
    """Renormalise the top-k softmax probabilities to sum to one (Qwen3-MoE: True)."""
    layer_pattern: tuple[int, ...]
    """Per layer: 1 = MoE layer, 0 = dense MLP (HF `mlp_only_layers`/`decoder_sparse_step`)."""
    aux_loss_coeff: float = 0.0
    """HF `router_aux_loss_coef`."""
    shared_expert_ffn_hidden_size: int | None = None
    """Intermediate size of the always-on shared expert (Qwen2-MoE); None if absent."""
    shared_expert_gate: bool = False
    """Scale the shared expert by sigmoid(x @ w_gate) (Qwen2-MoE)."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "topk", "ffn_hidden_size"):
            _check_positive("moe", name, getattr(self, name))
        if self.topk > self.num_experts:
            raise ValueError(f"moe.topk={self.topk} exceeds moe.num_experts={self.num_experts}")


@dataclass(frozen=True)
class ArchConfig:
    """A decoder-only transformer as `models.archs` reads it from a Hugging Face config."""

    arch: str
    """Architecture key: qwen2, qwen3, qwen2_moe or qwen3_moe."""
    vocab_size: int
    """Rows of the HF embedding (before Megatron's padding)."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    """Key/value heads (GQA groups)."""
    head_dim: int
    ffn_hidden_size: int
    """Intermediate size of dense MLP layers."""
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool
    """Bias on the q/k/v projections (Qwen2)."""
    qk_norm: bool
    """RMSNorm on each query/key head before RoPE (Qwen3)."""
    tie_word_embeddings: bool
    moe: MoEArch | None = None
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)
    """The HF config.json contents this was read from (written back on export)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "num_kv_heads", "head_dim", "ffn_hidden_size"):
            _check_positive("arch", name, getattr(self, name))
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"arch.num_attention_heads={self.num_attention_heads} is not a "
                             f"multiple of arch.num_kv_heads={self.num_kv_heads}")
        if self.moe is not None and len(self.moe.layer_pattern) != self.num_layers:
            raise ValueError(f"moe.layer_pattern has {len(self.moe.layer_pattern)} entries "
                             f"for {self.num_layers} layers")

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's vocab: rounded up to a multiple of 128 * tp (rows past vocab_size are 0)."""
        multiple = 128 * tp
        return -(-self.vocab_size // multiple) * multiple

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer `layer` (0-based) has routed experts."""
        return self.moe is not None and self.moe.layer_pattern[layer] == 1


# ------------------------------------------------------------------------------ root
@dataclass
class Config:
    """A whole recipe. Sections added by later issues go here as fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
