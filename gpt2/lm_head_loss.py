"""The language-model head and its cross-entropy in one pass over chunks of tokens, for training.

The plain way computes every position's logits (tokens × 50,257 floats: 206 MB in fp32 for 1,024 tokens, 13 GB for
a 64 × 1,024 GPU micro-batch), then log-softmax, then the backward pass reads them all again. Here each chunk's
logits are made, turned into the loss and into the gradients of the hidden states and of the head's weight right
away, and dropped: the logits never exist for the whole batch, and the softmax runs on a chunk that stays in cache.
The backward pass only scales the gradients already computed. The result is the same loss and the same gradients
as `F.cross_entropy(hidden @ weight.T, targets)` up to float rounding.

Matmuls run in the autocast dtype when autocast is on (as `nn.Linear` would), the softmax always in fp32.
"""

from __future__ import annotations

import torch

from gpt2.config import IGNORE_INDEX


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def chunk_tokens(device: torch.device, n_vocab: int) -> int:
    """Tokens per chunk: on CPU about 50 MB of fp32 logits (cache-sized work), on GPUs about 1 GB (large matmuls)."""
    budget = 1 << 30 if device.type == "cuda" else 200 << 20
    return max(1, budget // (4 * n_vocab))


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, n_vocab: int, chunk: int, dtype: torch.dtype, need_grads: bool):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight[:n_vocab].to(dtype)  # (V, C): padded rows never enter the softmax
            valid = targets != IGNORE_INDEX
            n_valid = valid.sum().clamp(min=1).to(torch.float32)
            loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_grads else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grads else None
            for start in range(0, hidden.shape[0], chunk):
                x = hidden[start : start + chunk].to(dtype)  # (n, C)
                t = targets[start : start + chunk]
                keep = valid[start : start + chunk]
                logits = (x @ w.T).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                safe_t = t.clamp(min=0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                loss += ((lse - picked) * keep).sum()
                if not need_grads:
                    continue
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_valid on the kept rows, 0 elsewhere
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                probs.mul_((keep / n_valid)[:, None])
                g = probs.to(dtype)
                grad_hidden[start : start + chunk] = (g @ w).to(hidden.dtype)
                if weight.requires_grad and dtype == torch.float32:  # frozen under LoRA: a third of the work saved
                    grad_w.addmm_(g.T, x)
                elif weight.requires_grad:
                    grad_w.add_(g.T @ x)  # the matmul in the compute dtype (as autocast's backward), summed in fp32
            ctx.save_for_backward(grad_hidden, grad_w)
            ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
            return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_w = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_w.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)  # padded rows: no gradient
            grad_weight[: grad_w.shape[0]] = grad_w * grad_loss
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight[:n_vocab].T` against `targets` (IGNORE_INDEX skipped), with the
    gradients of `hidden` and `weight` computed chunk by chunk. hidden (N, C), weight (V_padded, C), targets (N,)."""
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LMHeadCrossEntropy.apply(
        hidden, weight, targets, n_vocab, chunk_tokens(hidden.device, n_vocab), _compute_dtype(hidden), need_grads
    )
