"""Summed log-likelihood of chosen tokens in many token rows, in one padded forward pass.

HellaSwag scores the ending tokens of each candidate row and perplexity scores the tokens of each sliding window
that no earlier window scored; both are "sum log p(token | everything before it in the row) over a tail of the row".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from gpt2.config import EOT_TOKEN, IGNORE_INDEX
from gpt2.protocols import LanguageModel


@torch.no_grad()
def row_logprobs(model: LanguageModel, rows: Sequence[Sequence[int]], first_targets: Sequence[int]) -> list[float]:
    """For each row, the summed log-probability of tokens ``row[first_target:]`` given the tokens before them.

    Each row is at most ``block_size + 1`` tokens: the model reads ``row[:-1]`` and predicts ``row[1:]``.
    Rows are right-padded to a common width; with causal attention padding can only sit after the tokens that
    matter, and padded positions are never targets, so a row's score does not depend on its neighbours beyond
    float rounding (the matmul shapes change with the batch).
    """
    if len(rows) != len(first_targets):
        raise ValueError(f"{len(rows)} rows but {len(first_targets)} first_targets")
    limit = model.config.block_size + 1
    for row, first in zip(rows, first_targets):
        if len(row) > limit:
            raise ValueError(f"row of {len(row)} tokens; at most block_size + 1 = {limit} fit")
        if not 1 <= first < len(row):
            raise ValueError(f"first_target {first} must be in [1, {len(row)}) for a row of {len(row)} tokens")
    width = max(len(row) for row in rows) - 1
    inputs = torch.full((len(rows), width), EOT_TOKEN, dtype=torch.long)  # (R, W); the pad id is never scored
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, W)
    for i, (row, first) in enumerate(zip(rows, first_targets)):
        tokens = torch.as_tensor(row, dtype=torch.long)
        inputs[i, : len(row) - 1] = tokens[:-1]
        targets[i, first - 1 : len(row) - 1] = tokens[first:]  # input position p predicts row[p + 1]
    device = next(model.parameters()).device
    scored = targets != IGNORE_INDEX  # (R, W)
    # Only the scored positions go through the head and log-softmax: on a small model the head is most of a
    # forward pass's work, and cloze endings and the second halves of perplexity windows are a fraction of the rows.
    logits, _ = model(inputs.to(device), logits_at=scored.to(device))  # (N, V)
    token_nll = F.cross_entropy(logits.float(), targets[scored].to(device), reduction="none")  # (N,)
    per_position = torch.zeros(len(rows), width, dtype=torch.float64)  # (R, W)
    per_position[scored] = -token_nll.double().cpu()
    return per_position.sum(dim=1).tolist()
