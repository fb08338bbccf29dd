"""Pure-torch references of sparseroute's ops, written for clarity, not speed.

They state the semantics the kernels must reproduce: the same expert choices and
permutation metadata exactly, the same float results up to per-dtype tolerance (and
exactly, for the combine, whose arithmetic order is fixed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gating_scores_reference(values: Tensor, score: str) -> Tensor:
    """Top-k gating's scores of ``values`` (already in the type they are computed in)."""
    return torch.softmax(values, dim=-1) if score == "softmax" else torch.sigmoid(values)


def group_scores_reference(keys: Tensor, num_groups: int, group_score_k: int) -> Tensor:
    """[T, G] from [T, E] keys: each group's ``group_score_k`` best keys (all of a smaller
    group), added best first from zero, one at a time (torch's sum may pair them otherwise)."""
    num_tokens, num_experts = keys.shape
    group_size = num_experts // num_groups
    grouped = keys.view(num_tokens, num_groups, group_size)
    best_keys = grouped.topk(min(group_score_k, group_size), dim=-1).values
    group_scores = torch.zeros_like(best_keys[..., 0])
    for i in range(best_keys.shape[-1]):
        group_scores = group_scores + best_keys[..., i]
    return group_scores


def topk_gating_reference(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    expert_bias: Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score_k: int = 2,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Differentiable with respect to ``logits`` (through the weights)."""
    num_tokens, num_experts = logits.shape
    acc = acc_dtype(logits.dtype)
    values = logits.to(acc)
    scores = gating_scores_reference(values, score)

    if expert_bias is None and num_groups is None:
        # Both score functions are strictly increasing: the logits order the scores exactly.
        keys = values.detach()
    else:
        keys = scores.detach()
        if expert_bias is not None:
            keys = keys + expert_bias.to(acc)
    if num_groups is not None:
        group_size = num_experts // num_groups
        group_scores = group_scores_reference(keys, num_groups, group_score_k)
        best_groups = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        allowed = torch.zeros(num_tokens, num_groups, dtype=torch.bool)
        allowed.scatter_(1, best_groups, True)
        allowed = allowed.repeat_interleave(group_size, dim=1)
        keys = keys.masked_fill(~allowed, float("-inf"))

    # Descending, stable: equal keys keep ascending expert order.
    experts = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = scores.gather(1, experts)
    if normalize:
        eps = 1e-20 if score == "sigmoid" else 0.0
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return weights * scale, experts


def permute_reference(x: Tensor, experts: Tensor, num_experts: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Rows sorted by (expert, slot index); empty (-1) slots produce no row."""
    num_tokens, k = experts.shape
    flat = experts.reshape(-1).to(torch.int64)
    slots = torch.arange(num_tokens * k)
    routed = flat >= 0
    sort_key = flat[routed] * (num_tokens * k) + slots[routed]
    row_to_slot = slots[routed][torch.argsort(sort_key)]
    slot_to_row = torch.full((num_tokens * k,), -1, dtype=torch.int64)
    slot_to_row[row_to_slot] = torch.arange(row_to_slot.numel())
    tokens_per_expert = torch.bincount(flat[routed], minlength=num_experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(tokens_per_expert, 0)])
    plan = {
        "tokens_per_expert": tokens_per_expert,
        "offsets": offsets,
        "row_to_slot": row_to_slot,
        "slot_to_row": slot_to_row.view(num_tokens, k),
    }
    return x[row_to_slot // k], plan


def unpermute_reference(y_sorted: Tensor, slot_to_row: Tensor, weights: Tensor | None) -> Tensor:
    """y[t] = sum over t's non-empty slots j, in slot order, of weights[t, j] * y_sorted[row]."""
    num_tokens, k = slot_to_row.shape
    acc = acc_dtype(y_sorted.dtype)
    # An extra zero row stands in for the empty slots (-1 indexes it).
    padded = torch.cat([y_sorted.to(acc), torch.zeros(1, y_sorted.shape[1], dtype=acc)])
    y = torch.zeros(num_tokens, y_sorted.shape[1], dtype=acc)
    for j in range(k):
        contribution = padded[slot_to_row[:, j]]
        if weights is not None:
            contribution = contribution * weights[:, j : j + 1].to(acc)
        y = y + contribution
    return y.to(y_sorted.dtype)


# Tolerances of float results against the references, per input dtype.
WEIGHT_TOLERANCE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 2e-6, "atol": 1e-7},
    torch.bfloat16: {"rtol": 2e-6, "atol": 1e-7},
    torch.float16: {"rtol": 2e-6, "atol": 1e-7},
}


def assert_weights_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    """Gating weights of the CUDA kernels against the CPU's (or the reference's) for logits of
    ``dtype``: within four times WEIGHT_TOLERANCE (the GPU's exp and sum orders differ)."""
    tolerance = WEIGHT_TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance["rtol"] * 4, atol=tolerance["atol"] * 4)


def grouped_linear_reference(
    x_sorted: Tensor, offsets: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
) -> Tensor:
    """Row r of expert e = (the e with offsets[e] <= r < offsets[e+1]) gets x[r] @ W_e (+ b_e);
    rows past offsets[E] are zero. One batched product over per-row weight copies."""
    rows = x_sorted.shape[0]
    routed = int(offsets[-1])
    row_expert = torch.searchsorted(offsets[1:], torch.arange(routed), right=True)
    matrices = weight[row_expert] if transposed else weight[row_expert].transpose(1, 2)
    y = torch.bmm(x_sorted[:routed].unsqueeze(1), matrices).squeeze(1)
    if bias is not None:
        y = y + bias[row_expert]
    padding = y.new_zeros(rows - routed, y.shape[1])
    return torch.cat([y, padding])


def capacity_plan_reference(
    experts: Tensor, num_experts: int, capacity: int, weights: Tensor | None, pad: bool
) -> dict[str, Tensor]:
    """Which slots each expert keeps, written as plainly as possible: for each expert, its
    slots in (token, choice) order; keep the first ``capacity`` (or the ``capacity`` heaviest,
    ties to the lower slot), then list the kept ones in slot order."""
    num_tokens, k = experts.shape
    flat = experts.reshape(-1).tolist()
    w = None if weights is None else weights.reshape(-1).tolist()
    row_to_slot: list[int] = []
    tokens_per_expert, dropped, offsets = [], [], []
    for e in range(num_experts):
        slots = [s for s, x in enumerate(flat) if x == e]
        if w is None:
            kept = slots[:capacity]
        else:
            kept = sorted(sorted(slots, key=lambda s: (-w[s], s))[:capacity])
        offsets.append(e * capacity if pad else len(row_to_slot))
        if pad:
            row_to_slot += kept + [-1] * (capacity - len(kept))
        else:
            row_to_slot += kept
        tokens_per_expert.append(len(kept))
        dropped.append(len(slots) - len(kept))
    offsets.append(len(row_to_slot))
    slot_to_row = [-1] * (num_tokens * k)
    for row, slot in enumerate(row_to_slot):
        if slot >= 0:
            slot_to_row[slot] = row
    return {
        "tokens_per_expert": torch.tensor(tokens_per_expert, dtype=torch.int64),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "row_to_slot": torch.tensor(row_to_slot, dtype=torch.int64),
        "slot_to_row": torch.tensor(slot_to_row, dtype=torch.int64).view(num_tokens, k),
        "dropped": torch.tensor(dropped, dtype=torch.int64),
    }


def normalized_scores_reference(logits: Tensor, score: str) -> Tensor:
    values = logits.to(acc_dtype(logits.dtype))
    if score == "softmax":
        return torch.softmax(values, dim=-1)
    s = torch.sigmoid(values)
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def load_balancing_loss_reference(
    logits: Tensor,
    experts: Tensor,
    *,
    score: str = "softmax",
    seq_len: int | None = None,
    mask: Tensor | None = None,
    scale: str = "megatron",
) -> Tensor:
    """Per group (the batch, or each sequence of seq_len tokens): E * sum_e f_e * P_e over the
    unmasked tokens; the mean over groups that have any."""
    num_tokens, num_experts = logits.shape
    k = experts.shape[1]
    probs = normalized_scores_reference(logits, score)
    valid = torch.ones(num_tokens, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    group = seq_len or max(num_tokens, 1)
    losses = []
    for start in range(0, num_tokens, group):
        rows = torch.arange(start, min(start + group, num_tokens))
        rows = rows[valid[rows]]
        if rows.numel() == 0:
            continue
        routed = experts[rows].reshape(-1)
        counts = torch.bincount(routed[routed >= 0], minlength=num_experts).to(probs.dtype)
        fraction = counts / (rows.numel() * (k if scale == "megatron" else 1))
        losses.append(num_experts * (fraction * probs[rows].mean(dim=0)).sum())
    return torch.stack(losses).mean() if losses else probs.new_zeros(())


def hf_mixtral_load_balancing_loss(gate_logits: Tensor, top_k: int, attention_mask: Tensor | None) -> Tensor:
    """Hugging Face transformers' Mixtral ``load_balancing_loss_func`` for one layer, restated."""
    num_experts = gate_logits.shape[1]
    routing_weights = torch.softmax(gate_logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected, num_experts)
    if attention_mask is None:
        tokens_per_expert = expert_mask.float().mean(dim=0)
        router_prob = routing_weights.mean(dim=0)
    else:
        batch, seq = attention_mask.shape
        m = (
            attention_mask[:, :, None, None]
            .expand(batch, seq, top_k, num_experts)
            .reshape(-1, top_k, num_experts)
        )
        tokens_per_expert = (expert_mask.float() * m).sum(0) / m.sum(0)
        m2 = attention_mask[:, :, None].expand(batch, seq, num_experts).reshape(-1, num_experts)
        router_prob = (routing_weights * m2).sum(0) / m2.sum(0)
    return (tokens_per_expert * router_prob.unsqueeze(0)).sum() * num_experts


def megatron_switch_loss(probs: Tensor, tokens_per_expert: Tensor, num_tokens: int, topk: int) -> Tensor:
    """Megatron-Core's ``switch_load_balancing_loss_func`` (coefficient 1), restated."""
    num_experts = probs.shape[1]
    return (probs.sum(dim=0) * tokens_per_expert).sum() * num_experts / (num_tokens * num_tokens * topk)


def megatron_sequence_loss(probs: Tensor, routing_map: Tensor, batch: int, seq_len: int, topk: int) -> Tensor:
    """Megatron-Core's ``sequence_load_balancing_loss_func`` (coefficient 1), restated."""
    num_experts = probs.shape[1]
    cost = routing_map.view(batch, seq_len, num_experts).sum(dim=1).to(probs.dtype) / (
        seq_len * topk / num_experts
    )
    return (cost * probs.view(batch, seq_len, num_experts).mean(dim=1)).sum(dim=1).mean()


def topp_gating_reference(
    logits: Tensor, p: float, min_k: int, max_k: int, inclusive: bool, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Token by token: experts by descending logit (stable), cumulative softmax probability
    in that order; keep while (inclusive) the sum before the expert is < p, or (exclusive)
    the sum including it is <= p; at least min_k, at most max_k; -1 / 0 after."""
    num_tokens, _ = logits.shape
    acc = acc_dtype(logits.dtype)
    probs = torch.softmax(logits.to(acc), dim=-1)
    order = torch.sort(logits.to(acc).detach(), dim=-1, descending=True, stable=True).indices
    weights = torch.zeros(num_tokens, max_k, dtype=acc)
    experts = torch.full((num_tokens, max_k), -1, dtype=torch.int64)
    rows = []
    for t in range(num_tokens):
        cumulative = torch.zeros((), dtype=acc)
        kept: list[int] = []
        for rank in range(max_k):
            e = int(order[t, rank])
            prob = probs[t, e]
            keep = rank < min_k or (bool(cumulative < p) if inclusive else bool(cumulative + prob <= p))
            if not keep:
                break
            cumulative = cumulative + prob.detach()
            kept.append(e)
        experts[t, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
        chosen = probs[t, kept] if kept else probs.new_zeros(0)
        if normalize and kept:
            chosen = chosen / chosen.sum()
        rows.append(torch.cat([chosen, probs.new_zeros(max_k - len(kept))]))
    if rows:
        weights = torch.stack(rows)
    return weights, experts


def megatron_sinkhorn(cost: Tensor, tol: float = 0.0001, iters: int | None = None) -> Tensor:
    """Megatron-Core's ``sinkhorn`` (moe_utils.py), restated, with an optional iteration cap."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps = 0.00000001
    error = 1e9
    d1_old = d1
    done = 0
    while error > tol and (iters is None or done < iters):
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
        done += 1
    return d1 * cost * d0.unsqueeze(1)


def expert_choice_reference(logits: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Per expert: sort tokens by (probability descending, token ascending), keep the first
    ``capacity``, list them in token order."""
    probs = torch.softmax(logits.to(acc_dtype(logits.dtype)), dim=-1)
    indices, gates = [], []
    for e in range(probs.shape[1]):
        order = torch.sort(probs[:, e].detach(), descending=True, stable=True).indices[:capacity]
        chosen = torch.sort(order).values
        indices.append(chosen)
        gates.append(probs[chosen, e])
    return torch.stack(indices), torch.stack(gates)


def token_count_reference(capacity: int | float, length: int) -> int:
    """Positions kept of ``length``: an int capacity as is (at most ``length``); a fraction
    ``ceil(capacity * length)``, a product within 1e-9 of an integer taken as it."""
    if isinstance(capacity, int):
        return min(capacity, length)
    exact = capacity * length
    nearest = round(exact)
    return nearest if abs(exact - nearest) <= 1e-9 * max(nearest, 1) else math.ceil(exact)


def select_tokens_reference(
    scores: Tensor, capacity: int | float, *, lengths: Tensor | None = None, threshold: float | None = None
) -> tuple[Tensor, Tensor]:
    """Per sequence, the kept positions ascending (then -1) and the [B, S] mask."""
    batch, seq_len = scores.shape
    width = token_count_reference(capacity, seq_len)
    values = scores.to(acc_dtype(scores.dtype)).tolist()
    indices = torch.full((batch, width), -1, dtype=torch.int64)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        length = seq_len if lengths is None else int(lengths[b])
        row = values[b][:length]
        if threshold is not None:
            kept = [p for p in range(length) if row[p] > threshold][:width]
        else:
            count = min(width, token_count_reference(capacity, length))
            kept = sorted(sorted(range(length), key=lambda p: (-row[p], p))[:count])
        indices[b, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
        mask[b, kept] = True
    return indices, mask


def gather_tokens_reference(x: Tensor, indices: Tensor) -> Tensor:
    """``x[b, indices[b, c]]``, zero rows for -1: torch.gather on clamped indices, masked."""
    valid = (indices >= 0).unsqueeze(-1)
    index = indices.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[2])
    return torch.where(valid, x.gather(1, index), torch.zeros((), dtype=x.dtype))


def scatter_tokens_reference(x: Tensor, y: Tensor, indices: Tensor, gate: Tensor | None = None) -> Tensor:
    """``x`` with the kept rows replaced by ``y``, or set to ``x + gate * y`` computed in the
    accumulator dtype and rounded once."""
    out = x.clone()
    acc = acc_dtype(x.dtype)
    for b in range(x.shape[0]):
        valid = indices[b] >= 0
        positions = indices[b][valid]
        rows = y[b][valid]
        if gate is None:
            out[b, positions] = rows
        else:
            g = gate[b, positions].to(acc).unsqueeze(-1)
            out[b, positions] = (x[b, positions].to(acc) + g * rows.to(acc)).to(x.dtype)
    return out


def layer_plan_reference(logits: Tensor) -> Tensor:
    """Argmax over (skip, execute, repeat); ties involving execute -> execute, skip vs
    repeat -> skip."""
    values = logits.to(acc_dtype(logits.dtype))
    skip, execute, repeat = values.unbind(-1)
    return torch.where(
        (execute >= skip) & (execute >= repeat),
        1,
        torch.where(skip >= repeat, 0, 2),
    ).to(torch.int64)


def bucket_by_plan_reference(plans: Tensor, max_batch: int | None) -> list[tuple[list[int], list[int]]]:
    """``(requests, plan)`` per batch: groups by first appearance, cut into max_batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for request, plan in enumerate(plans.tolist()):
        groups.setdefault(tuple(plan), []).append(request)
    size = max_batch or max(len(plans), 1)
    return [
        (requests[i : i + size], list(plan))
        for plan, requests in groups.items()
        for i in range(0, len(requests), size)
    ]


def batcher_reference(
    routing: list[set[tuple[int, int]]], arrivals: list[int], max_batch: int, max_wait: int, policy: str
) -> list[tuple[list[int], int, int]]:
    """``(requests, distinct pairs, round)`` per batch of a lookahead batcher: overdue requests
    (waited >= max_wait) first, oldest first; then the oldest; then FIFO order, or the request
    adding the fewest new (layer, expert) pairs (ties: older). Idle rounds are skipped."""
    order = sorted(range(len(arrivals)), key=lambda r: (arrivals[r], r))
    queue: list[int] = []
    queued_at: dict[int, int] = {}
    batches = []
    round_, offset, nxt = 0, 0, 0
    while nxt < len(order) or queue:
        now = round_ + offset
        if not queue and arrivals[order[nxt]] > now:
            offset += arrivals[order[nxt]] - now
            continue
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            queue.append(order[nxt])
            queued_at[order[nxt]] = round_
            nxt += 1
        chosen = [r for r in queue if round_ - queued_at[r] >= max_wait][:max_batch] if queue else []
        if not chosen and queue:
            chosen = [queue[0]]
        union = set().union(*(routing[r] for r in chosen))
        while len(chosen) < max_batch:
            rest = [r for r in queue if r not in chosen]
            if not rest:
                break
            pick = (
                rest[0]
                if policy == "fifo"
                else min(rest, key=lambda r: (len(routing[r] - union), queue.index(r)))
            )
            chosen.append(pick)
            union |= routing[pick]
        batches.append((chosen, len(union), now))
        queue = [r for r in queue if r not in chosen]
        round_ += 1
    return batches


def block_permute_reference(
    x: Tensor, experts: Tensor, num_experts: int, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """permute with each expert's rows in whole blocks of ``block_size`` rows: the reference
    plan's rows of each expert, then zero rows up to the next multiple of ``block_size``.
    Returns ``(x_sorted, offsets, row_to_slot)``."""
    _, plan = permute_reference(x, experts, num_experts)
    k = experts.shape[1]
    rows, slots, offsets = [], [], [0]
    for e in range(num_experts):
        mine = plan["row_to_slot"][plan["offsets"][e] : plan["offsets"][e + 1]]
        padding = -len(mine) % block_size
        slots.append(torch.cat([mine, torch.full((padding,), -1, dtype=torch.int64)]))
        rows.append(torch.cat([x[mine // k], x.new_zeros(padding, x.shape[1])]))
        offsets.append(offsets[-1] + len(mine) + padding)
    return torch.cat(rows), torch.tensor(offsets), torch.cat(slots)
