"""Rollouts for PPO and GRPO: sample responses with the KV-cache engine, then score every sampled token.

    reference = build_reference(policy, cfg.reference_checkpoint)
    rollout = generate_rollout(policy, prompt_ids, max_new_tokens=32, temperature=1.0, stop_ids=[eos],
                               pad_id=pad, reference=reference, generator=gen)
    rollout.logprobs, rollout.ref_logprobs, rollout.response_mask   # (B, N) each

Generation (`llmlab.generate.generate_tokens`) samples the whole batch with a KV cache; the policy and
the reference then score the sampled tokens in one batched forward pass each (`llmlab.rlhf.scoring`).

Responses: the stop token is part of the response (mask 1) so the policy learns when to stop; positions
after it are padding (mask 0). A response whose first token is the stop token is "empty" (text "") but
still has one scored token. A response that reaches max_new_tokens without a stop token is `truncated`.

The updates that train on rollouts are in `llmlab.rlhf.updates`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import DataError
from llmlab.generate import generate_tokens
from llmlab.rlhf.scoring import Reference, forward_mask, response_logprobs

# --------------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A batch of sampled responses with everything the updates need. Row i of every tensor is one
    response; GRPO keeps the group_size samples of a prompt contiguous."""

    sequences: Tensor  # (B, P + N) left-padded prompts, then responses (pad after the stop token)
    prompt_mask: Tensor  # (B, P) 1 on real prompt tokens
    prompt_len: int  # P: responses start at this column
    response_mask: Tensor  # (B, N) float, 1 on generated tokens (the stop token included)
    logprobs: Tensor  # (B, N) policy log-probs at sampling time (the "old" policy)
    ref_logprobs: Tensor  # (B, N) reference log-probs
    values: Tensor | None  # (B, N) value estimates (PPO), else None
    truncated: Tensor  # (B,) bool: no stop token within max_new_tokens

    @property
    def response_tokens(self) -> Tensor:
        return self.sequences[:, self.prompt_len :]

    @property
    def attention_mask(self) -> Tensor | None:
        """The mask to pass to the model for forward passes over `sequences` (None when unpadded)."""
        return forward_mask(self.prompt_mask, self.response_mask.shape[1])

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(dim=-1)

    def responses(self) -> list[list[int]]:
        """Token ids of each response (stop token included, padding dropped)."""
        return [row[m.bool()].tolist() for row, m in zip(self.response_tokens, self.response_mask)]

    def select(self, index: Tensor) -> Rollout:
        """The rows `index` (a mini-batch), every tensor indexed alike."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[index] if isinstance(v, Tensor) else v
        return Rollout(**values)


def truncated_rows(response_tokens: Tensor, response_mask: Tensor, stop_ids: Sequence[int]) -> Tensor:
    """(B,) True where no stop token was generated (the response ran into max_new_tokens)."""
    if not stop_ids:
        return torch.ones(response_tokens.shape[0], dtype=torch.bool, device=response_tokens.device)
    stop = torch.tensor(list(stop_ids), device=response_tokens.device)
    stopped = (torch.isin(response_tokens, stop) & response_mask.bool()).any(dim=-1)
    return ~stopped


@torch.no_grad()
def generate_rollout(
    policy: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    reference: Reference | None = None,
    value_head: nn.Module | None = None,
    on_tokens: Callable[[Tensor], None] | None = None,
    compile: bool = False,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups) and score the sampled tokens: policy
    log-probs (and values) in one batched forward pass, reference log-probs in another.

    Without a reference, `ref_logprobs` is a copy of `logprobs` (zero KL). `on_tokens(next_ids)` is
    called after every generated column (an exception raised there abandons the rollout, e.g. on Ctrl-C).
    compile: sample through `generate_tokens(compile=True)`.
    """
    if any(len(p) == 0 for p in prompt_ids):
        raise DataError("rollout: an empty prompt; every prompt needs at least one token")
    was_training = policy.training
    out = generate_tokens(policy, [list(p) for p in prompt_ids], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_token_id=list(stop_ids) or None, pad_token_id=pad_id, generator=generator,
                          on_tokens=on_tokens, compile=compile)
    sequences, P = out.sequences, out.prompt_len
    response_mask = out.response_mask.float()
    mask = forward_mask(out.prompt_mask, response_mask.shape[1])
    policy.eval()  # dropout off: these are the log-probs the tokens were sampled with
    logp, values = response_logprobs(policy, sequences, P, mask, temperature=temperature, value_head=value_head)
    if reference is not None:
        ref_logp = reference.logprobs(sequences, P, mask, temperature=temperature)
    else:
        ref_logp = logp.clone()
    policy.train(was_training)
    zero = torch.zeros_like(logp)
    logp = torch.where(response_mask.bool(), logp, zero)
    ref_logp = torch.where(response_mask.bool(), ref_logp, zero)
    if values is not None:
        values = torch.where(response_mask.bool(), values, zero)
    return Rollout(
        sequences=sequences,
        prompt_mask=out.prompt_mask,
        prompt_len=P,
        response_mask=response_mask,
        logprobs=logp,
        ref_logprobs=ref_logp,
        values=values,
        truncated=truncated_rows(sequences[:, P:], response_mask, stop_ids),
    )


def decode_responses(tokenizer: Any, responses: Sequence[Sequence[int]], stop_ids: Sequence[int] = ()) -> list[str]:
    """Response texts for reward functions: stop tokens and special tokens dropped (an empty response
    decodes to "")."""
    stop = set(stop_ids)
    return [tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True) for tokens in responses]


def reward_columns(examples: Sequence[dict[str, Any]], repeat: int = 1) -> tuple[list[str], dict[str, list[Any]]]:
    """Prompt texts and the other columns of prompt examples (as `data.prompts` yields them), each
    repeated `repeat` times in a row (GRPO groups), for `reward_fn(prompts, completions, **columns)`.
    A column missing from some examples (mixed datasets) is None there; token ids are not passed."""
    keys: dict[str, None] = {}
    for ex in examples:
        keys.update(dict.fromkeys(k for k in ex if k not in ("prompt", "prompt_ids")))
    prompts = [ex["prompt"] for ex in examples for _ in range(repeat)]
    columns = {k: [ex.get(k) for ex in examples for _ in range(repeat)] for k in keys}
    return prompts, columns


def source_rewards(reward_fn: Any) -> dict[str, float]:
    """`reward/<source>`: the mean unweighted reward of each source of the last call of a combined reward
    (`rlhf.rewards.CombinedReward.last_breakdown`), when it has two or more sources, so a run shows which
    one moves; {} for a single source (it is `reward`) or a plain function."""
    breakdown = getattr(reward_fn, "last_breakdown", None) or {}
    if len(breakdown) < 2:
        return {}
    return {f"reward/{name}": sum(values) / len(values) for name, values in breakdown.items() if values}


def score_rollout(reward_fn: Callable[..., Sequence[float]], tokenizer: Any, examples: Sequence[dict[str, Any]],
                  rollout: Rollout, stop_ids: Sequence[int], repeat: int = 1) -> tuple[Tensor, list[str]]:
    """Rewards (B,) of the rollout's responses to `examples` (each repeated `repeat` times) and the
    decoded completions. Non-finite rewards are an error naming the reward source."""
    completions = decode_responses(tokenizer, rollout.responses(), stop_ids)
    prompts, columns = reward_columns(examples, repeat)
    values = reward_fn(prompts, completions, **columns)
    rewards = torch.tensor([float(v) for v in values], dtype=torch.float32, device=rollout.logprobs.device)
    if rewards.numel() != len(completions):
        raise DataError(f"reward_functions: got {rewards.numel()} rewards for {len(completions)} completions")
    if not bool(torch.isfinite(rewards).all()):
        raise DataError("reward_functions: a reward is NaN or infinite; make the reward function return finite "
                        "numbers")
    return rewards, completions


# --------------------------------------------------------------------------------------------------
# Prompt data and evaluation shared by PPO and GRPO
# --------------------------------------------------------------------------------------------------


def prompt_budget(max_prompt_len: int, max_new_tokens: int, model_max_len: int) -> int:
    """Prompt tokens kept so that prompt + response fits the model: min(max_prompt_len, max_seq_len -
    max_new_tokens). A budget below 1 is a config error."""
    from llmlab.errors import ConfigError

    budget = min(max_prompt_len, model_max_len - max_new_tokens)
    if budget < 1:
        raise ConfigError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's "
                          f"max_seq_len={model_max_len}; lower max_new_tokens")
    return budget


def rollout_stats(rollout: Rollout) -> dict[str, float]:
    """Response length (mean tokens), share truncated (no stop token) and share empty (stop token first)."""
    lengths = rollout.response_lengths
    return {"response_len": float(lengths.mean()) if lengths.numel() else 0.0,
            "truncated": float(rollout.truncated.float().mean()) if lengths.numel() else 0.0,
            "empty": float((lengths <= 1).float().mean()) if lengths.numel() else 0.0}


@torch.no_grad()
def greedy_reward(policy: nn.Module, tokenizer: Any, reward_fn: Callable[..., Sequence[float]],
                  batches: Sequence[Sequence[dict[str, Any]]], *, max_new_tokens: int, stop_ids: Sequence[int],
                  pad_id: int, compile: bool = False) -> dict[str, Any]:
    """Mean reward of greedy responses to held-out prompt batches (deterministic, so evaluations of
    one run compare), plus one example completion."""
    total, count, example = 0.0, 0, None
    for examples in batches:
        out = generate_tokens(policy, [ex["prompt_ids"] for ex in examples], max_new_tokens=max_new_tokens,
                              temperature=0.0, eos_token_id=list(stop_ids) or None, pad_token_id=pad_id,
                              compile=compile)
        completions = decode_responses(tokenizer, out.responses, stop_ids)
        prompts, columns = reward_columns(examples)
        values = [float(v) for v in reward_fn(prompts, completions, **columns)]
        total += sum(values)
        count += len(values)
        if example is None and completions:
            example = completions[0]
    return {"val_reward": total / max(count, 1), "val_prompts": count, "val_example": example}
