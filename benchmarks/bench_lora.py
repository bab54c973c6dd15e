"""LoRA vs full fine-tuning on the GPT-2 124M shape, side by side in one run.

For each mode: trainable parameters, optimizer state bytes (AdamW keeps two fp32 moments per trainable parameter),
peak resident memory of a process that does only that fine-tune (each mode runs in its own fresh process, so one
mode's allocations never inflate the other's peak), and training tokens/s over the same batches.

  python -m benchmarks.bench_lora [--steps 4 --batch 2 --seq-len 256 --rank 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time


def run_mode(mode: str, steps: int, batch: int, seq_len: int, rank: int, threads: int, out) -> None:
    import torch

    from gpt2 import GPT, preset
    from gpt2.lora import LoRAConfig, apply_lora, count_parameters
    from gpt2.train import TrainConfig, make_optimizer, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(preset("gpt2"))
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=rank, targets=("attn.c_attn",)))
    trainable, total = count_parameters(model)
    cfg = TrainConfig(total_batch_tokens=batch * seq_len, micro_batch=batch, seq_len=seq_len, max_steps=steps,
                      max_lr=1e-4, min_lr=1e-5, warmup_steps=1, weight_decay=0.0, autocast="fp32")
    optimizer = make_optimizer(model, cfg, "cpu")
    x = torch.randint(0, 50257, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    batches = iter(lambda: (x[:, :-1], x[:, 1:]), None)
    times = [train_step(model, optimizer, batches, s, cfg, 1, device=torch.device("cpu")).seconds for s in range(steps)]
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    out.put({
        "mode": mode, "trainable": trainable, "total": total, "optimizer_bytes": state_bytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": batch * seq_len / statistics.median(times[1:] or times),
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for mode in ("full", "lora"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_mode, args=(mode, args.steps, args.batch, args.seq_len, args.rank, args.threads, queue))
        started = time.perf_counter()
        proc.start()
        results[mode] = queue.get()
        proc.join()
        results[mode]["seconds"] = time.perf_counter() - started
    full, lora = results["full"], results["lora"]
    print(f"GPT-2 124M shape, fp32, batch {args.batch} × {args.seq_len} tokens, {args.threads} threads,"
          f" LoRA rank {args.rank} on attn.c_attn")
    print(f"{'':<22}{'full':>14}{'LoRA':>14}{'LoRA / full':>14}")
    rows = [
        ("trainable parameters", full["trainable"], lora["trainable"], "{:,.0f}"),
        ("optimizer state MB", full["optimizer_bytes"] / 2**20, lora["optimizer_bytes"] / 2**20, "{:,.1f}"),
        ("peak RSS MB", full["peak_rss_mb"], lora["peak_rss_mb"], "{:,.0f}"),
        ("training tokens/s", full["tokens_per_s"], lora["tokens_per_s"], "{:,.1f}"),
    ]
    for name, a, b, fmt in rows:
        print(f"{name:<22}{fmt.format(a):>14}{fmt.format(b):>14}{b / a:>13.3f}x")
    print(f"LoRA trainable fraction: {100 * lora['trainable'] / lora['total']:.3f}% of {lora['total']:,} parameters")


if __name__ == "__main__":
    main()
