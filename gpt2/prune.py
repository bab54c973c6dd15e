"""Attention-head analysis and structured head pruning.

Analysis: which heads of a layer do the same thing (cosine similarity of their attention patterns and of their
outputs on some text) and which heads the loss depends on (Michel et al. 2019, "Are Sixteen Heads Really Better than
One?": the importance of head h is |∂loss/∂ξ_h| for a gate ξ_h = 1 that multiplies the head's output).

Pruning removes heads for real: a new GPT whose c_attn and c_proj are smaller, with the per-layer head counts in its
config (GPTConfig.n_head_per_layer), so it saves, loads, generates and serves like any other model.
`mask_heads` is the reference it must match: the same model with the heads' contributions zeroed.

Head indices always refer to the model at hand: after pruning, a layer's remaining heads are renumbered 0..h-1 in
their original order. A pruning plan is a dict {layer: [head, ...]}.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch

from gpt2.model import GPT, CausalSelfAttention

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs and targets (B, T), as gpt2.train's loaders yield them
Plan = dict[int, list[int]]


# ------------------------------------------------------------------------------------------ per-head activations


def _device(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device


def _tokens(batch: torch.Tensor | Batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, tuple) else batch


@contextlib.contextmanager
def _eval_mode(model: GPT) -> Iterator[None]:
    was_training = model.training
    model.eval()  # dropout would make the analysis random
    try:
        yield
    finally:
        model.train(was_training)


def _split_heads(attn: CausalSelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (B, nh, T, T) and each head's write into the residual stream (B, nh, T, C).

    SDPA never materialises the probabilities, so this recomputes the layer explicitly from its own weights, in fp32.
    A head's write is its attention output times its own columns of c_proj: heads in different layers or subspaces
    are compared in the one space they share, the residual stream (c_proj's bias belongs to no head).
    """
    B, T, C = x.shape
    nh, hs = attn.n_head, attn.head_dim
    q, k, v = attn.c_attn(x).float().split(nh * hs, dim=2)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # (B, nh, T, T)
    y = probs @ v  # (B, nh, T, hs)
    proj = attn.c_proj.weight.float().view(C, nh, hs)  # c_proj reads the heads side by side
    return probs, torch.einsum("bnth,cnh->bntc", y, proj)  # (B, nh, T, C)


@torch.no_grad()
def _heads_by_layer(model: GPT, idx: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer, probabilities, head outputs) for each layer in turn, so only one layer's (B, nh, T, T) is alive."""
    inputs: dict[int, torch.Tensor] = {}
    blocks = model.transformer.h
    hooks = [
        block.attn.register_forward_pre_hook(lambda _module, args, layer=layer: inputs.__setitem__(layer, args[0]))
        for layer, block in enumerate(blocks)
    ]
    try:
        with _eval_mode(model):
            model(idx.to(_device(model)), last_only=True)  # only the attention inputs are needed
    finally:
        for hook in hooks:
            hook.remove()
    for layer, block in enumerate(blocks):
        yield layer, *_split_heads(block.attn, inputs.pop(layer))


def attention_patterns(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (B, nh, T, T) of each head on tokens `idx` (B, T); rows sum to 1."""
    return [probs for _, probs, _ in _heads_by_layer(model, idx)]


def head_outputs(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, what each head adds to the residual stream (B, nh, T, C); with c_proj's bias they sum to the
    attention sub-layer's output."""
    return [outputs for _, _, outputs in _heads_by_layer(model, idx)]


# ------------------------------------------------------------------------------------------ similarity and importance


@dataclass(frozen=True)
class HeadSimilarity:
    """Per layer an (nh, nh) cosine-similarity matrix between the layer's heads."""

    patterns: list[torch.Tensor]  # of the attention probabilities
    outputs: list[torch.Tensor]  # of the heads' writes into the residual stream


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().sqrt()
    return (gram / torch.outer(norms, norms).clamp_min(1e-30)).float().cpu()


def head_similarity(model: GPT, batches: Iterable[torch.Tensor | Batch]) -> HeadSimilarity:
    """Cosine similarity between every two heads of a layer, over all tokens of `batches` (tokens (B, T) or
    (inputs, targets) pairs).

    Each head's patterns (or outputs) over all batches form one long vector; the cosine of two such vectors is
    accumulated from Gram matrices, so the result does not depend on how the text was split into batches.
    """
    pattern_grams: list[torch.Tensor] = []
    output_grams: list[torch.Tensor] = []
    for batch in batches:
        for layer, probs, outputs in _heads_by_layer(model, _tokens(batch)):
            nh = probs.shape[1]
            p = probs.transpose(0, 1).reshape(nh, -1)  # (nh, B·T·T)
            o = outputs.transpose(0, 1).reshape(nh, -1)  # (nh, B·T·C)
            if layer == len(pattern_grams):
                pattern_grams.append(torch.zeros(nh, nh, dtype=torch.float64, device=p.device))
                output_grams.append(torch.zeros(nh, nh, dtype=torch.float64, device=p.device))
            pattern_grams[layer] += (p @ p.T).double()
            output_grams[layer] += (o @ o.T).double()
    if not pattern_grams:
        raise ValueError("head_similarity needs at least one batch of tokens")
    return HeadSimilarity([_cosine(g) for g in pattern_grams], [_cosine(g) for g in output_grams])


class RedundantHead(NamedTuple):
    layer: int
    head: int  # the head to drop
    twin: int  # the most similar head of its layer that was still there when it was dropped
    similarity: float


def redundant_heads(similarity: Sequence[torch.Tensor], k: int) -> list[RedundantHead]:
    """The k most redundant heads, most redundant first, from per-layer (nh, nh) similarity matrices.

    Greedy: the most similar pair of heads still present (in any layer) loses one head — the one more similar on
    average to the rest of its layer — and the similarities are looked at again without it. Every layer keeps at
    least one head, so k can be at most (total heads - layers).
    """
    remaining = [list(range(s.shape[0])) for s in similarity]
    most = sum(len(heads) - 1 for heads in remaining)
    if not 0 <= k <= most:
        raise ValueError(f"k must be in [0, {most}] (every layer keeps one head), got {k}")
    dropped = []
    for _ in range(k):
        best = None
        for layer, (sim, heads) in enumerate(zip(similarity, remaining)):
            if len(heads) < 2:
                continue
            sub = sim.detach().cpu()[heads][:, heads].double()  # (n, n) among the heads still present
            off_diagonal = sub.masked_fill(torch.eye(len(heads), dtype=torch.bool), float("-inf"))
            a, b = divmod(int(off_diagonal.argmax()), len(heads))
            if best is None or off_diagonal[a, b] > best[0]:
                mean_similarity = (sub.sum(dim=1) - sub.diagonal()) / (len(heads) - 1)
                drop, keep = (a, b) if mean_similarity[a] > mean_similarity[b] else (b, a)
                best = (float(off_diagonal[a, b]), layer, heads[drop], heads[keep])
        value, layer, head, twin = best
        remaining[layer].remove(head)
        dropped.append(RedundantHead(layer, head, twin, value))
    return dropped


def group_by_layer(heads: Iterable[Sequence[int]]) -> Plan:
    """A pruning plan {layer: [head, ...]} from (layer, head, ...) items such as RedundantHead."""
    plan: Plan = {}
    for layer, head, *_ in heads:
        plan.setdefault(layer, []).append(head)
    return {layer: sorted(plan[layer]) for layer in sorted(plan)}


@contextlib.contextmanager
def _head_gates(model: GPT, gates: Sequence[torch.Tensor]) -> Iterator[None]:
    """Multiply each head's output by its gate (nh,) on the way into c_proj, for as long as the context lasts."""

    def gate_input(attn: CausalSelfAttention, gate: torch.Tensor):
        def hook(_module, args):
            (y,) = args  # (B, T, nh·hs): the heads side by side
            return (y * gate.repeat_interleave(attn.head_dim),)

        return hook

    hooks = [
        block.attn.c_proj.register_forward_pre_hook(gate_input(block.attn, gate))
        for block, gate in zip(model.transformer.h, gates)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def head_importance(
    model: GPT,
    batches: Iterable[Batch],
    *,
    normalize: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[torch.Tensor]:
    """Per layer (nh,): the mean over `batches` of |∂loss/∂ξ_h|, the gradient with respect to a gate on each head.

    To first order it is how much the loss changes when the head is removed. With `normalize`, each layer's scores
    are divided by their L2 norm, which Michel et al. found to make scores of different layers comparable for a
    global ranking. Higher is more important. Only the gates get gradients; the model's .grad stay untouched.
    """
    device = _device(model)
    gates = [torch.ones(block.attn.n_head, device=device, requires_grad=True) for block in model.transformer.h]
    totals = [torch.zeros_like(gate) for gate in gates]
    n_batches = 0
    with _eval_mode(model), _head_gates(model, gates):
        for x, y in batches:
            with autocast():
                _, loss = model(x.to(device), y.to(device))
            for total, grad in zip(totals, torch.autograd.grad(loss, gates)):
                total += grad.abs()
            n_batches += 1
    if n_batches == 0:
        raise ValueError("head_importance needs at least one (inputs, targets) batch")
    scores = [total / n_batches for total in totals]
    if normalize:
        scores = [s / s.norm().clamp_min(1e-30) for s in scores]
    return scores


# ------------------------------------------------------------------------------------------ plans, masking, pruning


def plan_pruning(scores: Sequence[torch.Tensor], fraction: float, min_heads_per_layer: int = 1) -> Plan:
    """Which heads to prune: floor(fraction × all heads) of the lowest-scoring heads over all layers, leaving at
    least `min_heads_per_layer` heads in every layer. `scores` per layer (nh,), higher = more important."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if min_heads_per_layer < 1:
        raise ValueError(f"min_heads_per_layer must be >= 1 (a layer keeps at least one head), got {min_heads_per_layer}")
    left = [len(layer_scores) for layer_scores in scores]
    total = sum(left)
    wanted = math.floor(fraction * total + 1e-9)  # 0.29 × 100 is 28.999… in floating point
    ranked = sorted(
        (float(score), layer, head) for layer, layer_scores in enumerate(scores) for head, score in enumerate(layer_scores)
    )
    plan: Plan = {}
    chosen = 0
    for _, layer, head in ranked:
        if chosen == wanted:
            break
        if left[layer] > min_heads_per_layer:
            left[layer] -= 1
            plan.setdefault(layer, []).append(head)
            chosen += 1
    if chosen < wanted:
        raise ValueError(
            f"fraction {fraction} asks for {wanted} of {total} heads, but only {chosen} can go while every layer"
            f" keeps min_heads_per_layer={min_heads_per_layer}"
        )
    return {layer: sorted(plan[layer]) for layer in sorted(plan)}


def _checked_plan(model: GPT, heads: Mapping[int, Iterable[int]], min_heads_per_layer: int) -> Plan:
    config = model.config
    plan: Plan = {}
    for layer, listed in heads.items():
        if not (isinstance(layer, int) and 0 <= layer < config.n_layer):
            raise ValueError(f"layer {layer!r} does not exist; the model has layers 0..{config.n_layer - 1}")
        n = config.heads_in_layer(layer)
        listed = list(listed)
        unknown = [h for h in listed if not (isinstance(h, int) and 0 <= h < n)]
        if unknown:
            raise ValueError(f"layer {layer} has heads 0..{n - 1}; there is no head {unknown}")
        if len(set(listed)) != len(listed):
            raise ValueError(f"layer {layer}: a head is listed twice in {listed}")
        if n - len(listed) < min_heads_per_layer:
            raise ValueError(
                f"pruning {len(listed)} of the {n} heads of layer {layer} leaves {n - len(listed)},"
                f" fewer than min_heads_per_layer={min_heads_per_layer}"
            )
        if listed:
            plan[layer] = sorted(listed)
    return plan


def _head_channels(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """The channels (positions in the side-by-side layout of heads) that belong to `heads`."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def mask_heads(model: GPT, heads: Mapping[int, Iterable[int]]) -> GPT:
    """A copy of `model` whose listed heads contribute nothing: their columns of c_proj are zero.

    Every shape stays the same, so this is the reference a pruned model must match. Masking every head of a layer
    is allowed here (the layer's attention then adds only c_proj's bias).
    """
    plan = _checked_plan(model, heads, min_heads_per_layer=0)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, dropped in plan.items():
            attn = masked.transformer.h[layer].attn
            attn.c_proj.weight[:, _head_channels(dropped, attn.head_dim)] = 0
    return masked


def prune_heads(model: GPT, heads: Mapping[int, Iterable[int]], *, min_heads_per_layer: int = 1) -> GPT:
    """A new model without the listed heads: their rows of c_attn (query, key and value, biases too) and their
    columns of c_proj are removed. Its outputs equal mask_heads(model, heads)'s up to float rounding.

    Every layer must keep at least `min_heads_per_layer` heads (at least one; see GPTConfig.n_head_per_layer).
    The model itself is not changed; the new one has its device, dtype and train/eval mode.
    """
    if min_heads_per_layer < 1:
        raise ValueError(f"min_heads_per_layer must be >= 1 (a layer keeps at least one head), got {min_heads_per_layer}")
    plan = _checked_plan(model, heads, min_heads_per_layer)
    config = model.config
    counts = tuple(config.heads_in_layer(layer) - len(plan.get(layer, [])) for layer in range(config.n_layer))
    state = model.state_dict()
    for layer, dropped in plan.items():
        nh, hs = config.heads_in_layer(layer), config.head_dim
        kept = _head_channels([h for h in range(nh) if h not in dropped], hs)
        rows = torch.cat([part * nh * hs + kept for part in range(3)])  # c_attn's output is [q | k | v]
        prefix = f"transformer.h.{layer}.attn."
        state[prefix + "c_attn.weight"] = state[prefix + "c_attn.weight"][rows]  # (3·h·hs, C)
        if config.bias:
            state[prefix + "c_attn.bias"] = state[prefix + "c_attn.bias"][rows]
        state[prefix + "c_proj.weight"] = state[prefix + "c_proj.weight"][:, kept]  # (C, h·hs); its bias stays
    weight = model.transformer.wte.weight
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation must not move the caller's random stream
        pruned = GPT(config.replace(n_head_per_layer=counts))
    pruned.load_state_dict(state)
    return pruned.to(device=weight.device, dtype=weight.dtype).train(model.training)
