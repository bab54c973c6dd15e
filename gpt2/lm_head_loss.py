"""The language-model head and its cross-entropy in one pass over chunks of tokens, for training.

The plain way computes every position's logits (tokens × 50,257 floats: 206 MB in fp32 for 1,024 tokens, 13 GB for
a 64 × 1,024 GPU micro-batch), then log-softmax, then the backward pass reads them all again. Here each chunk's
logits are made, turned into the loss and into the gradients of the hidden states and of the head's weight right
away, and dropped: the logits never exist for the whole batch. The backward pass only scales the gradients already
computed. The result is the same loss and the same gradients as `F.cross_entropy(hidden @ weight.T, targets)` up to
float rounding.

On CPU each chunk is further cut into blocks of vocabulary rows, for two reasons measured on the 124M model:
- oneDNN runs `(1024, 768) @ (768, 4096)` and the weight gradient `(4096, 1024) @ (1024, 768)` near the machine's
  bf16 peak, but the same products over all 50,257 rows at 290-360 GFLOP/s;
- every temporary (all but the weight gradient itself) stays under glibc's 32 MB mmap threshold, so it is reused
  from the heap instead of being mapped, page-faulted and filled afresh each step (the whole-vocabulary buffers cost
  about 0.3 s per step that way).
The logsumexp is combined across blocks; the weight gradient is written block by block, never zero-filled first.

Matmuls run in the autocast dtype when autocast is on (as `nn.Linear` would), the softmax always in fp32.
"""

from __future__ import annotations

import torch

from gpt2.config import IGNORE_INDEX


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def chunk_tokens(device: torch.device, n_vocab: int) -> int:
    """Tokens per chunk: on CPU about 200 MB of fp32 logits in flight, on GPUs about 1 GB (large matmuls), there a
    multiple of 64 tokens (the weight gradient's inner dimension)."""
    if device.type == "cuda":
        return max(64, (1 << 30) // (4 * n_vocab) // 64 * 64)
    return max(1, (200 << 20) // (4 * n_vocab))


def head_rows(device: torch.device, n_vocab: int, padded: int) -> int:
    """The weight rows multiplied: on a GPU the padded rows too, their logits then set to -inf, since a logits row
    50,304 wide (a multiple of 64) keeps cuBLAS on its fast kernels where 50,257-wide rows fell back to older ones
    that made the head half of a 124M training step on an H100 (docs/gpu.md). On CPU only the real rows."""
    return padded if device.type == "cuda" else n_vocab


def vocab_block(device: torch.device, rows: int) -> int:
    """Vocabulary rows per block: 4,096 on CPU (see the module docstring); GPUs take every row at once."""
    return 4096 if device.type == "cpu" else rows


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, n_vocab: int, chunk: int, blocks: tuple, dtype, need_grads: bool):
        with torch.autocast(hidden.device.type, enabled=False):
            grad_w_needed = need_grads and weight.requires_grad
            valid = targets != IGNORE_INDEX
            n_valid = valid.sum().clamp(min=1).to(torch.float32)
            loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_grads else None
            # Every real row of the weight gradient is written by the first chunk; only padded rows need zeros.
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if grad_w_needed else None
            if grad_w is not None:
                grad_w[n_vocab:].zero_()
            w_blocks = [weight[s:e].to(dtype) for s, e in blocks]  # (v, C) each; padded rows stay out of the softmax
            for start in range(0, hidden.shape[0], chunk):
                x = hidden[start : start + chunk].to(dtype)  # (n, C)
                t = targets[start : start + chunk]
                keep = valid[start : start + chunk]
                safe_t = t.clamp(min=0)
                # Pass 1: per block, the logits, their max m and exp(logits - m) in fp32, and the target's logit.
                exps, maxes, sums = [], [], []
                picked = torch.zeros(len(t), dtype=torch.float32, device=t.device)
                for (s, e), w in zip(blocks, w_blocks):
                    z = x @ w.T  # (n, v)
                    if e > n_vocab:
                        z[:, n_vocab - s :] = float("-inf")  # padded rows (head_rows): exp() gives 0, no gradient
                    m = z.amax(dim=-1).float()  # (n,)
                    ez = torch.sub(z, m[:, None]).exp_()  # fp32: the subtraction promotes, no separate upcast
                    if need_grads:  # kept for pass 2; evaluation needs only the sums
                        exps.append(ez)
                    maxes.append(m)
                    sums.append(ez.sum(dim=-1))
                    inside = (safe_t >= s) & (safe_t < e)
                    picked += torch.where(inside, z.gather(1, (safe_t - s).clamp(0, e - s - 1)[:, None])[:, 0], 0).float()
                maxes, sums = torch.stack(maxes), torch.stack(sums)  # (blocks, n)
                top = maxes.amax(dim=0)  # (n,)
                lse = top + torch.log((sums * torch.exp(maxes - top)).sum(dim=0))  # (n,)
                loss += ((lse - picked) * keep).sum()
                if not need_grads:
                    continue
                # Pass 2: d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_valid on kept rows, 0 elsewhere;
                # softmax = exp(logits - m) * exp(m - lse), so each stored block is scaled once, in place.
                scale = keep / n_valid  # (n,)
                rows = torch.arange(len(t), device=t.device)
                gh = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # summed over blocks in fp32
                for (s, e), w, ez, m in zip(blocks, w_blocks, exps, maxes):
                    probs = ez.mul_((torch.exp(m - lse) * scale)[:, None])
                    inside = (safe_t >= s) & (safe_t < e)
                    probs[rows[inside], safe_t[inside] - s] -= scale[inside]
                    g = probs.to(dtype)
                    gh += g @ w
                    if grad_w is not None:
                        if start == 0:
                            grad_w[s:e] = g.T @ x  # the matmul in the compute dtype (as autocast's backward)
                        else:
                            grad_w[s:e] += g.T @ x  # summed in fp32
                grad_hidden[start : start + chunk] = gh.to(hidden.dtype)
            ctx.save_for_backward(grad_hidden, grad_w)
            ctx.weight_dtype = weight.dtype
            return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_w = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # The buffer was made for this one backward pass: scale it in place rather than allocate another.
            grad_weight = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight[:n_vocab].T` against `targets` (IGNORE_INDEX skipped), with the
    gradients of `hidden` and `weight` computed chunk by chunk. hidden (N, C), weight (V_padded, C), targets (N,)."""
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    device = hidden.device
    rows = head_rows(device, n_vocab, weight.shape[0])
    block = vocab_block(device, rows)
    return _LMHeadCrossEntropy.apply(
        hidden,
        weight,
        targets,
        n_vocab,
        chunk_tokens(device, n_vocab),
        tuple((s, min(s + block, rows)) for s in range(0, rows, block)),  # each block's (start, end) weight rows
        _compute_dtype(hidden),
        need_grads,
    )
