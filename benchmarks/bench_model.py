"""Model speed side by side with Hugging Face transformers, same machine, same threads, same shapes.

1. Training step (forward + backward + AdamW) tokens/s, fp32 and under bf16 autocast, for the 124M shape at B=2,
   T=512 and for the `small` preset, each model eager and under torch.compile; achieved FLOP/s as a fraction of
   this machine's measured matmul peak.
2. Greedy decoding, batch 1, 128 new tokens, 124M shape: this project in fp32 / bf16 / int8 / NF4 (when
   bitsandbytes is installed) vs transformers' `generate` in fp32; tokens/s as a fraction of the bandwidth bound
   (memory bandwidth ÷ weight bytes per token), and what the smaller weights change: next-token agreement and KL
   divergence vs fp32 on real text, plus perplexity when a trained checkpoint is given (--checkpoint).

  python -m benchmarks.bench_model [--threads 2] [--steps 3] [--rounds 3] [--checkpoint runs/pretrain/local/final]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2 import GPT, get_tokenizer, preset
from gpt2.corpus import python_docs_documents
from gpt2.device import measure_matmul_flops
from gpt2.quantize import decode_bytes_per_token, quantize_int8, quantize_nf4, to_bf16
from gpt2.train import TrainConfig, make_optimizer


def hf_twin(model: GPT):
    """A transformers GPT2LMHeadModel with exactly `model`'s weights (through this project's checkpoint format)."""
    import tempfile

    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")


def time_train_steps(model, loss_fn, B: int, T: int, steps: int, autocast: bool) -> float:
    opt = make_optimizer(model, TrainConfig(), "cpu")
    x = torch.randint(0, 50257, (B, T))
    y = torch.randint(0, 50257, (B, T))
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return B * T / (sum(times) / len(times))


def ours_loss(model, x, y):
    return model(x, y, return_logits=False)[1]  # as gpt2.train.train_step calls it


def hf_loss(model, x, y):
    logits = model(x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def interleaved_rounds(ours: Callable[[], float], theirs: Callable[[], float], rounds: int) -> list[tuple[float, float]]:
    """(ours, theirs) tokens/s measured back to back, `rounds` times. A step's large buffers are page-faulted anew
    whenever the allocator hands them back to the OS, which makes single figures swing by 10-20% with the process's
    history; a ratio of two neighbouring measurements, and the median over rounds, does not."""
    return [(ours(), theirs()) for _ in range(rounds)]


def summarize(pairs: list[tuple[float, float]]) -> tuple[float, float, float, float, float]:
    """Median tokens/s of each side, then the median, lowest and highest of the per-round ratios."""
    ratios = [a / b for a, b in pairs]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(ratios), min(ratios), max(ratios))


def bench_training(steps: int, rounds: int, compile_too: bool) -> None:
    fp32_peak = measure_matmul_flops("cpu", torch.float32, n=2048)
    bf16_peak = measure_matmul_flops("cpu", torch.bfloat16, n=2048)
    print(f"\n## Training step tokens/s ({torch.get_num_threads()} threads; measured matmul peak: fp32 "
          f"{fp32_peak / 1e9:.0f} GFLOP/s, bf16 {bf16_peak / 1e9:.0f} GFLOP/s)")
    print("Both models take the same optimizer (this project's AdamW: fused, decay on matrices only). 'compiled' is")
    print("torch.compile of each model (the pretraining config's train.compile); the last column compares this")
    print("project compiled with transformers as most people run it, uncompiled. tokens/s: the median of")
    print(f"{rounds} rounds, each measuring the two models back to back; ratio: the median of the rounds' ratios")
    print("(lowest-highest).")
    print("| model | precision | mode | this project | transformers | ratio | project GFLOP/s | of peak | vs transformers eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, B, T in (("gpt2", 2, 512), ("small", 8, 256)):
        torch.manual_seed(0)
        ours = GPT(preset(name))
        hf = hf_twin(ours)
        models = {"eager": (ours, hf)}
        if compile_too:
            models["compiled"] = (torch.compile(ours), torch.compile(hf))
        for autocast in (False, True):
            hf_eager = None
            for mode, (m_ours, m_hf) in models.items():
                pairs = interleaved_rounds(lambda: time_train_steps(m_ours, ours_loss, B, T, steps, autocast),
                                           lambda: time_train_steps(m_hf, hf_loss, B, T, steps, autocast), rounds)
                a, b, ratio, low, high = summarize(pairs)
                hf_eager = hf_eager or b
                flops = ours.flops_per_token(T) * a
                peak = bf16_peak if autocast else fp32_peak
                label = "bf16 autocast" if autocast else "fp32"
                print(f"| {name} B={B} T={T} | {label} | {mode} | {a:.0f} | {b:.0f} | {ratio:.2f}x ({low:.2f}-{high:.2f})"
                      f" | {flops / 1e9:.0f} | {flops / peak:.0%} | {a / hf_eager:.2f}x |", flush=True)


def measure_bandwidth() -> float:
    """Bytes/s of a large fp32 matrix-vector product (what batch-1 decoding does for every weight)."""
    w = torch.randn(8192, 8192)
    v = torch.randn(8192)
    w @ v
    best = min(_timed(lambda: w @ v) for _ in range(10))
    return w.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_tps(generate, n_new: int) -> float:
    generate(8)  # warm-up
    return n_new / min(_timed(lambda: generate(n_new)) for _ in range(2))


@torch.inference_mode()
def quality_vs_fp32(reference: GPT, other: GPT, tokens: torch.Tensor) -> tuple[float, float, float, float]:
    """(agreement of greedy next tokens, mean KL(fp32 || other), perplexity fp32, perplexity other) on `tokens`."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    a = reference(x)[0].float()
    b = other(x)[0].float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).mean().item()
    ppl = lambda logits: torch.exp(F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))).item()  # noqa: E731
    return agree, kl, ppl(a), ppl(b)


def bench_decoding(n_new: int, checkpoint: str | None) -> None:
    torch.manual_seed(0)
    model = GPT.from_pretrained(checkpoint) if checkpoint else GPT(preset("gpt2"))
    model.eval()
    enc = get_tokenizer()
    prompt = enc.encode_ordinary("The Python standard library")
    bandwidth = measure_bandwidth()
    hf = hf_twin(model).eval()

    def hf_generate(n: int):
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)

    hf_tps = decode_tps(hf_generate, n_new)
    text = " ".join(d.text for d in python_docs_documents()[-40:])
    tokens = torch.tensor([enc.encode_ordinary(text)[: 4 * 256]]).view(4, 256)
    what = f"checkpoint {checkpoint}" if checkpoint else "the 124M shape, random weights"
    print(f"\n## Greedy decoding, batch 1, {n_new} new tokens, {what}; memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"transformers fp32 generate: {hf_tps:.1f} tokens/s")
    print("| this project | tokens/s | vs transformers fp32 | weight bytes/token | of bandwidth bound | next-token agreement | KL vs fp32 | perplexity fp32 → this |")
    print("|---|---|---|---|---|---|---|---|")
    variants = [("fp32", model), ("bf16 weights", to_bf16(model)), ("int8 dynamic", quantize_int8(model))]
    if importlib.util.find_spec("bitsandbytes") is not None:
        variants.append(("NF4 blocks, bf16 head", quantize_nf4(model, device="cpu")))
    for label, variant in variants:
        tps = decode_tps(lambda n, v=variant: v.generate([prompt], n, temperature=0, stop_at_eot=False), n_new)
        nbytes = decode_bytes_per_token(variant)
        bound = bandwidth / nbytes
        agree, kl, p_ref, p_var = quality_vs_fp32(model, variant, tokens)
        print(f"| {label} | {tps:.1f} | {tps / hf_tps:.2f}x | {nbytes / 1e6:.0f} MB | {tps / bound:.0%} |"
              f" {agree:.1%} | {kl:.4f} | {p_ref:.2f} → {p_var:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each pair, taken in turn (median reported)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--checkpoint", default=None, help="a trained 124M-or-other checkpoint for the decoding quality figures")
    p.add_argument("--only", choices=["train", "decode"], default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling takes minutes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench_model: torch {torch.__version__}, {args.threads} threads")
    if args.only in (None, "train"):
        bench_training(args.steps, args.rounds, compile_too=not args.no_compile)
    if args.only in (None, "decode"):
        bench_decoding(args.new_tokens, args.checkpoint)


if __name__ == "__main__":
    main()
