"""Will a recipe fit its cluster, and how long will a step take? An analytic planner.

    python tools/plan.py --recipe examples/recipes/qwen2.5_72b/grpo.yaml --gpus 32 [--gpu h100]
        [--rollout-tp 8] [--colocation sleep|resident] [--materialized-logits] [--json out.json]
    python tools/plan.py --validate [--json bench/results/plan_validation.json]

Memory per GPU (GiB = 2^30 bytes), on the pipeline stage that needs the most:
  weights      bf16 (2 bytes/param; + 2 with FP8 for TE's FP8 weight and transpose copies)
  gradients    fp32 main-grad buffer (4 bytes/param: this stack sets grad_reduce_in_fp32)
  optimizer    Megatron's distributed optimizer: fp32 master + Adam m + v = 12 bytes/param,
               sharded over DP x CP (dense) or the expert-data-parallel group (experts)
  activations  per token per layer (bytes, h hidden, q/kv widths, f FFN; TP-split; the h
               terms split too under sequence parallelism): 2 norms x (input 2h + output 2h),
               Q/K/V 2(q + 2kv), attention output 2q, gated MLP 4f (gate, up) + 2f (SiLU
               product), an MoE layer the same per routed copy (top-k) of the token's input
               2h + 6fe; FP8 stores GEMM inputs in 1 byte. Fused (flash/TE) attention
               keeps no s^2 scores, so `selective` recompute saves nothing more; `full`
               keeps only each layer's 2h input plus one layer's activations. Micro-batches
               in flight under 1F1B: min(pp - stage, micro-batches), x (1 + (pp-1)/(pp vp))
               when interleaved.
  logits       last stage: micro-batch tokens x vocab/TP x (2 bf16 + 4 fp32 for the
               log-softmax backward) unless the log-prob is fused
  rollout      vLLM reserves gpu_memory_utilization x GPU memory (weights/TP + KV cache;
               at least the weights and one longest sequence's KV, or it will not start).
               `resident`: engine and trainer share the GPU at once (this stack today: the
               engine is not put to sleep); `sleep`: the engine sleeps while the trainer
               runs (NeMo-RL colocated), so the peak is the larger of the two.
  overhead     3 GiB (CUDA context, NCCL buffers, allocator fragmentation).

Step time: training = model FLOPs (utils.flops, with recompute) / (GPUs x dense peak of the
training precision x assumed MFU: 0.40 dense, 0.28 MoE — Megatron-LM reports up to 47% on
H100, Megatron-MoE 276 TFLOP/s of 989 for Qwen3-235B); log-prob passes are forwards at that
MFU. Rollout = decode iterations x max(bytes read per GPU / (HBM x 0.7), FLOPs / (peak x 0.4)):
each iteration reads the weights (for MoE, the experts a batch of B tokens touches: E(1 - (1 -
k/E)^B)) and every live sequence's KV cache; B is the batch the KV cache holds (at most 256,
vLLM's max_num_seqs); iterations = max(generated tokens / B, longest completion).
Not modelled, so the time is an optimistic bound (the validation shows by how much): weight
sync, engine sleep/wake and optimizer offload, TP/EP/PP communication, vLLM host overhead per
iteration, MoE kernels below bandwidth at small batches, load imbalance across engines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from openr1_mega.config.schema import ArchConfig
from openr1_mega.models.archs import arch_config
from openr1_mega.utils.flops import forward_flops, train_step_flops
from openr1_mega.utils.peak import GPU_SPECS, GpuSpec

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30
OVERHEAD_GIB = 3.0
MFU_DENSE, MFU_MOE = 0.40, 0.28
DECODE_BW_EFF, DECODE_MFU, MAX_NUM_SEQS = 0.7, 0.4, 256
VALIDATION = ROOT / "tools" / "plan_validation.yaml"


@dataclass
class Layout:
    """Training parallelism (Megatron) and the rollout engine's tensor parallelism."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    vp: int = 1
    sequence_parallel: bool = False
    pp_first_stage_layers: int | None = None
    pp_last_stage_layers: int | None = None
    gen_tp: int = 1


@dataclass
class Workload:
    """What one step does (GRPO: rollout then training; pretraining: training only)."""

    sequences: int
    """Sequences trained per step (GRPO: prompts x group size)."""
    mean_seq_len: float
    """Mean tokens per sequence (prompt + completion)."""
    micro_batch_tokens: int
    """Tokens of one micro-batch on one DP rank (before CP splits it)."""
    recompute: str = "none"
    fp8: bool = False
    fused_logprob: bool = False
    logprob_forwards: int = 0
    """Extra no-grad forwards per step (old / reference log-probs)."""
    rollout: dict | None = None
    """prompt_tokens, max_new_tokens, gpu_memory_utilization, colocation (resident|sleep)."""


@dataclass
class Plan:
    """The planner's answer: memory terms (GiB) of the worst stage, times (s), verdict."""

    gpu: str
    gpus: int
    memory: dict[str, float] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    capacity_gib: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.memory["peak"]

    @property
    def verdict(self) -> str:
        short = self.peak_gib - self.capacity_gib
        return "fits" if short <= 0 else f"does not fit by {short:.1f} GiB"


def stage_layers(num_layers: int, lay: Layout) -> list[int]:
    """Decoder layers per pipeline stage (Megatron's split with optional first/last counts)."""
    if lay.pp == 1:
        return [num_layers]
    first, last = lay.pp_first_stage_layers, lay.pp_last_stage_layers
    middle = lay.pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if rest < 0 or (rest % middle if middle else rest):
        raise ValueError(f"{num_layers} layers do not split evenly over parallel.pp={lay.pp} "
                         f"stages (parallel.pp_first_stage_layers={first}, "
                         f"parallel.pp_last_stage_layers={last})")
    even = rest // middle if middle else 0
    return ([even if first is None else first] + [even] * (lay.pp - 2)
            + [even if last is None else last])


def layer_params(arch: ArchConfig, layer: int) -> tuple[float, float]:
    """(dense, expert) parameters of one decoder layer: attention + norms + MLP/router."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_kv_heads * d
    dense = h * (q + 2 * kv) + q * h + 2 * h + (q + 2 * kv) * arch.qkv_bias + 2 * d * arch.qk_norm
    if not arch.is_moe_layer(layer):
        return dense + 3 * h * arch.ffn_hidden_size, 0.0
    moe = arch.moe
    dense += h * moe.num_experts + 3 * h * (moe.shared_expert_ffn_hidden_size or 0)
    return dense, moe.num_experts * 3 * h * moe.ffn_hidden_size


def stage_params(arch: ArchConfig, lay: Layout, stage: int) -> tuple[float, float]:
    """(dense, expert) parameters held by one GPU of pipeline stage `stage`."""
    counts = stage_layers(arch.num_layers, lay)
    start = sum(counts[:stage])
    dense = expert = 0.0
    for layer in range(start, start + counts[stage]):
        d, e = layer_params(arch, layer)
        dense, expert = dense + d, expert + e
    vocab = arch.padded_vocab_size(lay.tp) * arch.hidden_size
    has_embedding = stage == 0
    has_head = stage == lay.pp - 1 and (not arch.tie_word_embeddings or lay.pp > 1)
    dense += vocab * (has_embedding + has_head) + arch.hidden_size * (stage == lay.pp - 1)
    etp = lay.etp if lay.etp is not None else lay.tp
    return dense / lay.tp, expert / (lay.ep * etp)


def activation_bytes_per_token(arch: ArchConfig, lay: Layout, layer: int, fp8: bool) -> float:
    """Bytes one token leaves for the backward of one layer (TP/SP-split; see module doc)."""
    h, t = arch.hidden_size, lay.tp
    hs = h / t if lay.sequence_parallel else h
    q = arch.num_attention_heads * arch.head_dim / t
    kv = arch.num_kv_heads * arch.head_dim / t
    gemm_in = 1 if fp8 else 2
    attn = 2 * (2 * hs + gemm_in * hs) + 2 * (q + 2 * kv) + 2 * q + gemm_in * q
    if not arch.is_moe_layer(layer):
        f = arch.ffn_hidden_size / t
        return attn + 4 * f + gemm_in * f
    etp = lay.etp if lay.etp is not None else t
    fe = arch.moe.ffn_hidden_size / etp
    routed = arch.moe.topk * (gemm_in * h + 4 * fe + gemm_in * fe) * (hs / h)
    fs = (arch.moe.shared_expert_ffn_hidden_size or 0) / t
    return attn + routed + 4 * fs + gemm_in * fs


def training_memory(arch: ArchConfig, lay: Layout, work: Workload, gpus: int) -> dict:
    """Per-GPU training memory (bytes) of the most loaded stage, split by term."""
    mp = lay.tp * lay.pp * lay.cp
    if gpus % mp:
        raise ValueError(f"--gpus {gpus} is not divisible by tp*pp*cp = {mp}")
    dp = gpus // mp
    etp = lay.etp if lay.etp is not None else lay.tp
    edp = max(1, gpus // (lay.pp * lay.ep * etp))
    tokens_mb = work.micro_batch_tokens / lay.cp
    n_micro = max(1, math.ceil(work.sequences * work.mean_seq_len / dp / work.micro_batch_tokens))
    counts = stage_layers(arch.num_layers, lay)
    worst: dict = {}
    for stage in range(lay.pp):
        dense, expert = stage_params(arch, lay, stage)
        params = dense + expert
        start = sum(counts[:stage])
        layers = range(start, start + counts[stage])
        per_mb = tokens_mb * sum(activation_bytes_per_token(arch, lay, i, work.fp8)
                                 for i in layers)
        working = 0.0
        if work.recompute == "full":   # keep layer inputs; one layer is rebuilt at a time
            hs = arch.hidden_size / (lay.tp if lay.sequence_parallel else 1)
            per_mb, working = tokens_mb * 2 * hs * len(layers), per_mb / max(1, len(layers))
        interleave = 1 + (lay.pp - 1) / (lay.pp * lay.vp) if lay.vp > 1 else 1.0
        in_flight = min(lay.pp - stage, n_micro) * interleave
        last = stage == lay.pp - 1
        logits = 0.0 if work.fused_logprob or not last else (
            tokens_mb * arch.padded_vocab_size(lay.tp) / lay.tp * 6)
        terms = dict(weights=params * (2 + 2 * work.fp8), gradients=params * 4,
                     optimizer=12 * (dense / (dp * lay.cp) + expert / edp),
                     activations=per_mb * in_flight + working, logits=logits,
                     overhead=OVERHEAD_GIB * GIB)
        terms["total"] = sum(terms.values())
        if not worst or terms["total"] > worst["total"]:
            worst = dict(terms, stage=stage)
    return worst


def total_params(arch: ArchConfig) -> tuple[float, float, float]:
    """(all, active per token, non-expert) parameters with embedding and head (vLLM's)."""
    dense = expert = 0.0
    for layer in range(arch.num_layers):
        d, e = layer_params(arch, layer)
        dense, expert = dense + d, expert + e
    dense += arch.vocab_size * arch.hidden_size * (2 - arch.tie_word_embeddings)
    active = expert * arch.moe.topk / arch.moe.num_experts if arch.moe else 0.0
    return dense + expert, dense + active, dense


def kv_bytes_per_token(arch: ArchConfig) -> float:
    """bf16 K and V of one token over all layers."""
    return 2 * 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim


def rollout_plan(arch: ArchConfig, lay: Layout, work: Workload, spec: GpuSpec,
                 gpus: int) -> dict:
    """vLLM memory per GPU and decode time of one step's rollouts (see module doc)."""
    roll = work.rollout
    reserved = roll["gpu_memory_utilization"] * spec.memory_gib * GIB
    n_all, n_active, n_dense = total_params(arch)
    weights = 2 * n_all / lay.gen_tp
    one_sequence = (roll["prompt_tokens"] + roll["max_new_tokens"]) * kv_bytes_per_token(
        arch) / lay.gen_tp
    kv_free = max(reserved - weights, one_sequence)
    prompt, max_new = roll["prompt_tokens"], roll["max_new_tokens"]
    mean_new = max(1.0, work.mean_seq_len - prompt)
    engines = gpus // lay.gen_tp
    per_engine = work.sequences / engines
    kv_tokens = kv_free * lay.gen_tp / kv_bytes_per_token(arch)
    batch = max(1.0, min(per_engine, MAX_NUM_SEQS, kv_tokens / work.mean_seq_len))
    iterations = max(per_engine * mean_new / batch, max_new)
    touched = (1 - (1 - arch.moe.topk / arch.moe.num_experts) ** batch) if arch.moe else 1.0
    expert_share = (n_all - n_dense) / n_all
    read = weights * (1 - expert_share + expert_share * touched)
    read += batch * (prompt + mean_new / 2) * kv_bytes_per_token(arch) / lay.gen_tp
    mem_s = read / (spec.hbm_tb_s * 1e12 * DECODE_BW_EFF)
    flop_s = 2 * n_active * batch / lay.gen_tp / (spec.bf16_tflops * 1e12 * DECODE_MFU)
    prefill = 2 * n_active * work.sequences * prompt / gpus / (spec.bf16_tflops * 1e12 * 0.4)
    return dict(vllm_reserved=max(reserved, weights + one_sequence), reserved=reserved,
                vllm_weights=weights,
                kv_free=kv_free, batch=batch,
                rollout_s=iterations * max(mem_s, flop_s) + prefill)


def plan(arch: ArchConfig, lay: Layout, work: Workload, gpu: str, gpus: int) -> Plan:
    """Memory per GPU and step time of `work` on `gpus` GPUs of kind `gpu`."""
    if gpu not in GPU_SPECS:
        raise ValueError(f"--gpu {gpu!r}: expected one of {sorted(GPU_SPECS)}")
    spec = GPU_SPECS[gpu]
    train = training_memory(arch, lay, work, gpus)
    result = Plan(gpu=gpu, gpus=gpus, capacity_gib=spec.memory_gib)
    result.memory = {k: v / GIB for k, v in train.items() if k != "stage"}
    result.memory["stage"] = train["stage"]
    peak_train = train["total"]
    seqs = [work.mean_seq_len] * work.sequences
    mfu = MFU_MOE if arch.moe else MFU_DENSE
    peak_flops = (spec.fp8_tflops if work.fp8 and spec.fp8_tflops else spec.bf16_tflops) * 1e12
    rate = gpus * peak_flops * mfu
    result.times["train_s"] = train_step_flops(arch, seqs, work.recompute) / rate
    result.times["logprob_s"] = work.logprob_forwards * forward_flops(arch, seqs).total / rate
    peak = peak_train
    if work.rollout:
        roll = rollout_plan(arch, lay, work, spec, gpus)
        result.memory.update(vllm_gib=roll["vllm_reserved"] / GIB,
                             vllm_weights_gib=roll["vllm_weights"] / GIB,
                             kv_cache_gib=roll["kv_free"] / GIB, rollout_batch=roll["batch"])
        result.times["rollout_s"] = roll["rollout_s"]
        if roll["vllm_reserved"] > roll["reserved"]:
            result.notes.append(
                f"vLLM needs {roll['vllm_reserved'] / GIB:.1f} GiB/GPU (weights/TP + one longest "
                f"sequence's KV) > gpu_memory_utilization x memory = {roll['reserved'] / GIB:.1f}"
                " GiB: raise rollout.gpu_memory_utilization or the rollout TP (the time assumes "
                "room for one sequence at a time)")
        together = work.rollout.get("colocation", "resident") == "resident"
        peak = peak_train + roll["vllm_reserved"] if together else max(peak_train,
                                                                       roll["vllm_reserved"])
    result.memory["peak"] = peak / GIB
    result.times["step_s"] = sum(result.times.values())
    result.times["tokens_per_s_per_gpu"] = (work.sequences * work.mean_seq_len
                                            / result.times["step_s"] / gpus)
    return result


def recipe_plan_inputs(recipe: Path, mean_completion_frac: float) -> tuple:
    """(arch, layout, workload) of a recipe YAML + the config.json shipped beside it.

    Read with plain yaml.safe_load so fields other branches add do not break the planner.
    The rollout TP is the recipe's `rollout.tp` (engines of that many ranks, rl/engine_groups.py);
    vLLM sleeps while the trainer runs (colocation "sleep": rl/rollout.py sleep/wake), and the
    loops' log-probs never form the logits (train/logprobs.py hidden_to_logprobs: fused). The
    mean completion is `mean_completion_frac` x rollout.max_tokens; prompts half their maximum.
    """
    data = yaml.safe_load(Path(recipe).read_text()) or {}
    config = Path(recipe).parent / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{recipe}: no config.json beside it (the planner reads the "
                                "architecture from the HF config shipped with the recipe)")
    arch = arch_config(json.loads(config.read_text()))
    par, model = data.get("parallel", {}), data.get("model", {})
    roll = data.get("rollout", {})
    lay = Layout(**{k: par[k] for k in ("tp", "pp", "cp", "ep", "etp", "sequence_parallel",
                                        "pp_first_stage_layers", "pp_last_stage_layers")
                    if k in par})
    lay.gen_tp = roll.get("tp", 1)
    fp8 = (data.get("precision") or {}).get("fp8") is not None
    recompute = model.get("recompute", "none")
    if "grpo" in data:
        grpo = data["grpo"]
        prompt = data.get("data", {}).get("max_prompt_tokens", 512) / 2
        max_new = roll.get("max_tokens", 256)
        work = Workload(
            sequences=grpo.get("prompts_per_step", 16) * roll.get("group_size", 8),
            mean_seq_len=prompt + mean_completion_frac * max_new,
            micro_batch_tokens=grpo.get("micro_batch_tokens", 4096), recompute=recompute,
            fp8=fp8, fused_logprob=True, logprob_forwards=int(grpo.get("beta", 0) > 0)
            + int(grpo.get("num_iterations", 1) > 1),
            rollout=dict(prompt_tokens=prompt, max_new_tokens=max_new, colocation="sleep",
                         gpu_memory_utilization=roll.get("gpu_memory_utilization", 0.3)))
    else:
        sft = data.get("sft", {})
        work = Workload(sequences=sft.get("rows_per_step", 8),
                        mean_seq_len=sft.get("seq_length", 512),
                        micro_batch_tokens=sft.get("seq_length", 512), recompute=recompute,
                        fp8=fp8, fused_logprob=True)
    return arch, lay, work


def validation_runs(path: Path = VALIDATION) -> list[dict]:
    """The published runs of plan_validation.yaml, each with arch/layout/workload built."""
    runs = yaml.safe_load(Path(path).read_text())["runs"]
    for run in runs:
        hf = run["hf_config"]
        if isinstance(hf, str):
            hf = json.loads((ROOT / hf).read_text())
        run["arch_config"] = arch_config(hf) if "model_type" in hf else ArchConfig(**hf)
        run["layout"] = Layout(**run["parallel"])
        run["workload"] = Workload(**run["workload"])
    return runs


def validate(path: Path = VALIDATION) -> list[dict]:
    """Plan every published run; rows with memory, verdict and time errors."""
    rows = []
    for run in validation_runs(path):
        result = plan(run["arch_config"], run["layout"], run["workload"], run["gpu"],
                      run["gpus"])
        row = dict(run=run["name"], source=run["source"], gpu=run["gpu"], gpus=run["gpus"],
                   memory_gib=round(result.peak_gib, 1), capacity_gib=result.capacity_gib,
                   verdict=result.verdict, notes=result.notes,
                   memory_terms={k: round(v, 2) for k, v in result.memory.items()},
                   times_s={k: round(v, 1) for k, v in result.times.items()})
        for key, est in (("tokens_per_s_per_gpu", result.times["tokens_per_s_per_gpu"]),
                         ("s_per_step", result.times["step_s"])):
            published = run["published"].get(key)
            if published:
                row[key] = dict(published=published, estimated=round(est, 1),
                                error_pct=round(100 * (est - published) / published, 1))
        rows.append(row)
    return rows


def _print_plan(result: Plan) -> None:
    print(f"{result.gpus} x {result.gpu} ({result.capacity_gib} GiB each), "
          f"most loaded pipeline stage: {result.memory['stage']}")
    for key, value in result.memory.items():
        if key not in ("stage", "peak"):
            print(f"  {key:<18} {value:10.2f}")
    print(f"  {'peak per GPU':<18} {result.peak_gib:10.2f} GiB -> {result.verdict}")
    for note in result.notes:
        print(f"  note: {note}")
    for key, value in result.times.items():
        print(f"  {key:<22} {value:10.1f}")


def _print_validation(rows: list[dict]) -> None:
    print("| run | GPUs | planner GiB/GPU | verdict | tokens/s/GPU published / est. (err) "
          "| s/step published / est. (err) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = []
        for key in ("tokens_per_s_per_gpu", "s_per_step"):
            item = row.get(key)
            cells.append(f"{item['published']:,} / {item['estimated']:,} "
                         f"({item['error_pct']:+.0f}%)" if item else "-")
        print(f"| {row['run']} | {row['gpus']} {row['gpu'].upper()} | {row['memory_gib']} of "
              f"{row['capacity_gib']} | {row['verdict']} | {cells[0]} | {cells[1]} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path)
    ap.add_argument("--gpus", type=int)
    ap.add_argument("--gpu", default="h100", choices=sorted(GPU_SPECS))
    ap.add_argument("--mean-completion-frac", type=float, default=0.5,
                    help="mean completion length as a share of rollout.max_tokens")
    ap.add_argument("--rollout-tp", type=int, help="vLLM tensor parallelism (default: "
                    "the recipe's rollout.tp, else 1)")
    ap.add_argument("--colocation", choices=("resident", "sleep"), default="sleep",
                    help="sleep (this stack on GPU): the engine sleeps while the trainer "
                    "runs; resident: engine and trainer hold memory at once")
    ap.add_argument("--materialized-logits", action="store_true",
                    help="plan a log-prob that forms the [tokens, vocab] logits (this "
                         "stack's loops never do: train/logprobs.py hidden_to_logprobs)")
    ap.add_argument("--validate", action="store_true", help="plan the published runs")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.validate:
        rows = validate()
        _print_validation(rows)
        out = dict(command="python tools/plan.py --validate", assumptions=dict(
            mfu_dense=MFU_DENSE, mfu_moe=MFU_MOE, decode_bandwidth_efficiency=DECODE_BW_EFF,
            decode_mfu=DECODE_MFU, max_num_seqs=MAX_NUM_SEQS, overhead_gib=OVERHEAD_GIB),
            runs=rows)
    else:
        if args.recipe is None or args.gpus is None:
            ap.error("--recipe and --gpus are required (or --validate)")
        arch, lay, work = recipe_plan_inputs(args.recipe, args.mean_completion_frac)
        lay.gen_tp = args.rollout_tp or lay.gen_tp
        work.fused_logprob = not args.materialized_logits
        if work.rollout:
            work.rollout["colocation"] = args.colocation
        result = plan(arch, lay, work, args.gpu, args.gpus)
        _print_plan(result)
        out = dict(recipe=str(args.recipe), gpus=args.gpus, gpu=args.gpu,
                   rollout_tp=lay.gen_tp, colocation=args.colocation,
                   verdict=result.verdict, notes=result.notes, memory_gib=result.memory,
                   times_s=result.times)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
