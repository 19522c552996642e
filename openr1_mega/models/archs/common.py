"""The HF <-> Megatron weight-name map: rules, rule builders and the tensor transforms.

A `Rule` pairs one Megatron parameter (its *global* name: global layer and expert
numbers, local-spec naming) with the Hugging Face tensors it is made of (hub on-disk
names), and says how the two layouts relate (`Kind`) and along which dimension Megatron
splits it across tensor-parallel ranks. Each `archs/<arch>.py` composes the builders below
into its `WeightMap`; conversion, export and vLLM weight sync all read that map.

Layouts (Megatron tensors are "full" = as at TP=1):
  COPY     one HF tensor, same layout.
  QKV      HF q [nh*d, H], k [ng*d, H], v [ng*d, H] (or biases) -> Megatron's grouped
           layout [ng * (nh/ng + 2) * d, H]: per KV group, its query heads, then k, then v.
           TP splits whole groups, so a contiguous split of dim 0 is right.
  GATE_UP  HF gate [F, H], up [F, H] -> linear_fc1 [2F, H] = [gate; up]; TP rank r holds
           [gate_r; up_r], so the two halves are split separately.
  VOCAB    embedding / lm_head [V, H] -> [Vp, H], rows V..Vp-1 zero (Vp = padded vocab).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from openr1_mega.config.schema import ArchConfig


class Kind(enum.Enum):
    """How the HF tensors of a rule become the one Megatron tensor."""

    COPY = "copy"
    QKV = "qkv"
    GATE_UP = "gate_up"
    VOCAB = "vocab"


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it is made of."""

    mcore: str
    """Global Megatron name (global layer/expert numbers, local-spec naming)."""
    hf: tuple[str, ...]
    """HF hub (on-disk) tensor names, in the order the `kind` expects."""
    kind: Kind
    tp_dim: int | None
    """Dimension of the Megatron tensor split across TP ranks; None = replicated."""
    layer: int | None = None
    """Global layer index; None for embedding, final norm and output layer."""
    expert: int | None = None
    """Global routed-expert index (split across EP ranks); None otherwise."""
    export: bool = True
    """False for the tied output layer: loaded into the last PP stage, never exported."""


@dataclass(frozen=True)
class WeightMap:
    """All rules of a model, grouped the way conversion streams them."""

    arch: ArchConfig
    pre: tuple[Rule, ...]
    layers: tuple[tuple[Rule, ...], ...]
    post: tuple[Rule, ...]

    def groups(self) -> Iterator[tuple[str, tuple[Rule, ...]]]:
        """(group name, rules): "embedding", "layer 0" ... "layer L-1", "final"."""
        yield "embedding", self.pre
        for i, rules in enumerate(self.layers):
            yield f"layer {i}", rules
        yield "final", self.post

    def rules(self) -> Iterator[Rule]:
        """Every rule, in streaming order."""
        for _, rules in self.groups():
            yield from rules


# ------------------------------------------------------------------- rule builders
def embedding_rules() -> tuple[Rule, ...]:
    return (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                 Kind.VOCAB, 0),)


def final_rules(arch: ArchConfig) -> tuple[Rule, ...]:
    norm = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.COPY, None)
    if arch.tie_word_embeddings:
        head = Rule("output_layer.weight", ("model.embed_tokens.weight",), Kind.VOCAB, 0,
                    export=False)
    else:
        head = Rule("output_layer.weight", ("lm_head.weight",), Kind.VOCAB, 0)
    return norm, head


def attention_rules(i: int, arch: ArchConfig) -> tuple[Rule, ...]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    qkv = tuple(f"{h}self_attn.{p}_proj" for p in "qkv")
    rules = [
        Rule(f"{m}input_layernorm.weight", (f"{h}input_layernorm.weight",), Kind.COPY, None, i),
        Rule(f"{m}self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in qkv),
             Kind.QKV, 0, i),
    ]
    if arch.qkv_bias:
        rules.append(Rule(f"{m}self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in qkv),
                          Kind.QKV, 0, i))
    if arch.qk_norm:
        rules += [
            Rule(f"{m}self_attention.q_layernorm.weight", (f"{h}self_attn.q_norm.weight",),
                 Kind.COPY, None, i),
            Rule(f"{m}self_attention.k_layernorm.weight", (f"{h}self_attn.k_norm.weight",),
                 Kind.COPY, None, i),
        ]
    rules += [
        Rule(f"{m}self_attention.linear_proj.weight", (f"{h}self_attn.o_proj.weight",),
             Kind.COPY, 1, i),
        Rule(f"{m}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",),
             Kind.COPY, None, i),
    ]
    return tuple(rules)


def mlp_rules(mcore: str, hf: str, layer: int, expert: int | None = None) -> tuple[Rule, ...]:
    """SwiGLU MLP: `mcore`.linear_fc1/fc2 <- `hf`.gate_proj/up_proj/down_proj."""
    return (
        Rule(f"{mcore}.linear_fc1.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
             Kind.GATE_UP, 0, layer, expert),
        Rule(f"{mcore}.linear_fc2.weight", (f"{hf}.down_proj.weight",), Kind.COPY, 1,
             layer, expert),
    )


def dense_mlp_rules(i: int) -> tuple[Rule, ...]:
    return mlp_rules(f"decoder.layers.{i}.mlp", f"model.layers.{i}.mlp", i)


def routed_expert_rules(i: int, arch: ArchConfig) -> tuple[Rule, ...]:
    """Router + every routed expert of MoE layer `i` (hub per-expert names)."""
    m, h = f"decoder.layers.{i}.mlp", f"model.layers.{i}.mlp"
    rules = [Rule(f"{m}.router.weight", (f"{h}.gate.weight",), Kind.COPY, None, i)]
    for e in range(arch.moe.num_experts):
        rules += mlp_rules(f"{m}.experts.local_experts.{e}", f"{h}.experts.{e}", i, e)
    return tuple(rules)


def shared_expert_rules(i: int) -> tuple[Rule, ...]:
    """Qwen2-MoE's always-on shared expert and its sigmoid gate."""
    m, h = f"decoder.layers.{i}.mlp", f"model.layers.{i}.mlp"
    return mlp_rules(f"{m}.shared_experts", f"{h}.shared_expert", i) + (
        Rule(f"{m}.shared_experts.gate_weight", (f"{h}.shared_expert_gate.weight",),
             Kind.COPY, None, i),
    )


# ------------------------------------------------------------------------ transforms
def to_mcore(rule: Rule, hf: Sequence[torch.Tensor], arch: ArchConfig,
             padded_vocab: int) -> torch.Tensor:
    """The full (TP=1) Megatron tensor of `rule` from its HF tensors."""
    if rule.kind is Kind.COPY:
        return hf[0]
    if rule.kind is Kind.GATE_UP:
        return torch.cat(list(hf), dim=0)
    if rule.kind is Kind.VOCAB:
        pad = padded_vocab - hf[0].shape[0]
        return torch.cat([hf[0], hf[0].new_zeros(pad, *hf[0].shape[1:])]) if pad else hf[0]
    q, k, v = hf
    groups, d = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    parts = (q.reshape(groups, -1, *rest), k.reshape(groups, d, *rest),
             v.reshape(groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def to_hf(rule: Rule, full: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
    """The HF tensors of `rule` (same order as `rule.hf`) from the full Megatron tensor."""
    if rule.kind is Kind.COPY:
        return [full]
    if rule.kind is Kind.GATE_UP:
        return list(full.chunk(2, dim=0))
    if rule.kind is Kind.VOCAB:
        return [full[: arch.vocab_size]]
    groups, d = arch.num_kv_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups * d
    rest = full.shape[1:]
    q, k, v = full.reshape(groups, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def shard(rule: Rule, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The part of the full Megatron tensor that TP rank `rank` of `size` holds."""
    if rule.tp_dim is None or size == 1:
        return full
    if rule.kind is Kind.GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=rule.tp_dim)[rank]


def unshard(rule: Rule, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every TP rank's part (in rank order)."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind is Kind.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(shards), dim=rule.tp_dim)


def hf_shapes(rule: Rule, arch: ArchConfig) -> list[tuple[int, ...]]:
    """Expected shapes of the HF tensors of `rule` (checked when reading a checkpoint)."""
    full = mcore_shape(rule, arch, arch.vocab_size)
    meta = torch.empty(full, device="meta")
    return [tuple(t.shape) for t in to_hf(rule, meta, arch)]


def mcore_shape(rule: Rule, arch: ArchConfig, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full Megatron tensor of `rule`."""
    name, hidden = rule.mcore, arch.hidden_size
    if rule.kind is Kind.VOCAB:
        return (padded_vocab, hidden)
    if rule.kind is Kind.QKV:
        rows = (arch.num_attention_heads + 2 * arch.num_kv_heads) * arch.head_dim
        return (rows,) if name.endswith("bias") else (rows, hidden)
    if name.endswith("linear_proj.weight"):
        return (hidden, arch.num_attention_heads * arch.head_dim)
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return (arch.head_dim,)
    if name.endswith(("layernorm.weight", "final_layernorm.weight")):
        return (hidden,)
    if name.endswith("router.weight"):
        return (arch.moe.num_experts, hidden)
    if name.endswith("gate_weight"):
        return (1, hidden)
    ffn = _ffn_size(rule, arch)
    return (2 * ffn, hidden) if rule.kind is Kind.GATE_UP else (hidden, ffn)


def _ffn_size(rule: Rule, arch: ArchConfig) -> int:
    if rule.expert is not None:
        return arch.moe.ffn_hidden_size
    if ".shared_experts." in rule.mcore:
        return arch.moe.shared_expert_ffn_hidden_size
    return arch.ffn_hidden_size
