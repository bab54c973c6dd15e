"""Generate text from a GPT-2 model: any checkpoint of this project, a Hugging Face GPT-2 directory or hub name, or an
MLflow model URI. Prompts come from --prompt, a file, or stdin (--prompts-file -).

    python jobs/generate.py --model runs/pretrain/local/final --prompt "The Python standard library" \\
        --max-tokens 300 --num-samples 5 --temperature 0.9 --top-k 50 --seed 0

The device and dtype it runs on are printed first (to stderr, so stdout holds only the samples).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from cluster.config import check_counts
from cluster.runtime.models import load_model
from gpt2 import GPT, get_tokenizer, preset
from gpt2.config import PRESETS
from gpt2.device import choose, describe
from gpt2.generate import SamplingParams, stream
from gpt2.protocols import ExitingModel
from gpt2.tokenizer import IncrementalDecoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint dir, Hugging Face dir or name (gpt2), or MLflow URI (models:/NAME/1,"
                                     " models:/NAME@champion)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a freshly initialised model of this preset")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="one prompt per line; '-' reads stdin")
    p.add_argument("--max-tokens", type=int, default=100, help="new tokens per sample (default 100)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.9, help="0 is greedy (default 0.9)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50; 0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="makes the output reproducible")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: CUDA, then Apple MPS, then CPU)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or auto (default: bf16 where the device computes it natively, else fp32)")
    args = p.parse_args(argv)
    if args.prompts_file:
        try:
            args.prompt += read_prompts(args.prompts_file)
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--prompts-file {args.prompts_file}: {e}")
    if not args.prompt:
        p.error("no prompt: give --prompt TEXT or --prompts-file FILE")
    check_counts(p, args, "num_samples", "max_tokens")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    try:
        SamplingParams(args.temperature, args.top_k or None, args.top_p)
    except ValueError as e:
        p.error(str(e))
    return args


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line of `path` ("-": stdin)."""
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device, dtype = choose(args.device, args.dtype)
    except ValueError as e:  # a device that is not on this machine, an unknown dtype
        sys.exit(f"error: {e}")
    if args.model:
        try:
            model = load_model(args.model, device=device, dtype=dtype)
        except ValueError as e:  # a missing/corrupt directory, an unknown hub name, an unreachable MLflow model
            sys.exit(f"error: {e}")
    else:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = GPT(preset(args.preset)).to(device=device, dtype=dtype).eval()
    print(f"# {args.model or 'random ' + args.preset} on {describe(device, dtype)}", file=sys.stderr)
    enc = get_tokenizer()
    for prompt in args.prompt:
        rows = [enc.encode_ordinary(prompt)] * args.num_samples
        options = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
        try:
            start, produced = time.perf_counter(), 0
            if args.stream:
                for i in range(args.num_samples):  # one sample at a time so the text reads naturally
                    decoder = IncrementalDecoder(enc)
                    print(f"--- sample {i + 1}\n{prompt}", end="", flush=True)
                    one = dict(options, seed=None if args.seed is None else args.seed + i)
                    for (token,) in stream(model, [rows[i]], args.max_tokens, **one):
                        print(decoder.push(token), end="", flush=True)
                        produced += 1
                    print(decoder.flush())
            else:
                samples = [[] for _ in rows]
                for tokens in stream(model, rows, args.max_tokens, **options):
                    for sample, t in zip(samples, tokens):
                        if t is not None:
                            sample.append(t)
                            produced += 1
                for i, sample in enumerate(samples):
                    print(f"--- sample {i + 1}\n{prompt}{enc.decode(sample)}")
        except ValueError as e:
            sys.exit(f"error: {e}")
        elapsed = time.perf_counter() - start
        print(f"# {produced} tokens in {elapsed:.2f}s ({produced / elapsed:.1f} tokens/s)", file=sys.stderr)
        if isinstance(model, ExitingModel):  # how often it stopped after its exit block
            stats = model.reset_stats()
            print(f"# early exit after block {model.exit_layer} (threshold {model.threshold:g}): exit rate"
                  f" {100 * stats.exit_rate:.1f}% of {stats.tokens} positions, {stats.mean_blocks:.2f} blocks per"
                  " position", file=sys.stderr)


if __name__ == "__main__":
    main()
