"""Rollouts for PPO and GRPO: sample responses with the KV-cache engine, then score every sampled token.

    reference = build_reference(policy, cfg.reference_checkpoint)
    rollout = generate_rollout(policy, prompt_ids, max_new_tokens=32, temperature=1.0, stop_ids=[eos],
                               pad_id=pad, reference=reference, generator=gen)
    rollout.logprobs, rollout.ref_logprobs, rollout.response_mask   # (B, N) each

Generation (`llmlab.generate.generate_tokens`) samples the whole batch with a KV cache. The
log-probabilities PPO and GRPO need are then recomputed in ONE batched forward pass over prompt +
response for the policy and one for the reference (the sampling loop keeps no graph and its per-step
logits would cost B x N x V memory). Positions are rebuilt exactly as generation built them (left padding
included), so at temperature 1 these log-probs equal the sampling distribution's.

Temperature: log-probs are those of logits / temperature, the distribution tokens were drawn from (top-k
and top-p filtering are ignored, as in TRL); the same scaling is used for the policy, its later updates
and the reference, so ratios and KL compare like with like.

Responses: the stop token is part of the response (mask 1) so the policy learns when to stop; positions
after it are padding (mask 0). A response whose first token is the stop token is "empty" (text "") but
still has one scored token. A response that reaches max_new_tokens without a stop token is `truncated`.

The reference policy (`Reference`) is the policy's starting weights: with LoRA the same PeftModel with its
adapter disabled (no second copy in memory), without LoRA a frozen copy, or a separate checkpoint when
`reference_checkpoint` names one.

Updates (`minibatch_updates`, shared by PPO and GRPO; DPO uses the same pieces): one optimizer step per
mini-batch; with optimizer=sophia the Hessian estimate is refreshed every `sophia_update_k` updates of the
run, from the policy's own sampled labels on the response tokens just updated (`rollout_hessian`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.checkpoint import base_transformer, unwrap_model
from llmlab.device import autocast, model_device
from llmlab.errors import DataError
from llmlab.generate import generate_tokens
from llmlab.optim import refresh_hessian_if_due
from llmlab.train.losses import gnb_rows_loss, token_logprobs

# --------------------------------------------------------------------------------------------------
# Log-probs (and values) of the response tokens in one forward pass
# --------------------------------------------------------------------------------------------------


def forward_mask(prompt_mask: Tensor, n_response: int) -> Tensor | None:
    """The attention mask generation used (real prompt tokens, then every response column), or None
    when no prompt is padded (plain causal attention, as in generation)."""
    if bool(prompt_mask.all()):
        return None
    ones = torch.ones(prompt_mask.shape[0], n_response, dtype=prompt_mask.dtype, device=prompt_mask.device)
    return torch.cat([prompt_mask, ones], dim=1)


def response_hidden(
    model: nn.Module,
    sequences: Tensor,
    prompt_len: int,
    attention_mask: Tensor | None = None,
    *,
    value_head: nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The final hidden states (B, N, D) that predict the response tokens `sequences[:, prompt_len:]`,
    and the value head's (B, N) estimates for the same states when `value_head` is given.

    One forward pass returns the final hidden states (B, P + N, D); position P - 1 + t predicts token
    P + t, and is also the state the value V_t is taken from. Gradients flow unless the caller disables
    them. Run under the caller's autocast."""
    total = sequences.shape[1]
    if prompt_len < 1:
        raise DataError("rollout: every prompt needs at least one token (the chat generation prompt)")
    hidden = model(sequences, attention_mask=attention_mask, output_hidden=True)  # (B, P + N, D)
    hidden = hidden[:, prompt_len - 1 : total - 1]  # (B, N, D): the states that predict each response token
    return hidden, (value_head(hidden) if value_head is not None else None)


def response_logprobs(
    model: nn.Module,
    sequences: Tensor,
    prompt_len: int,
    attention_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens `sequences[:, prompt_len:]` under `model` (at `temperature`),
    and the value head's estimates for the same states when `value_head` is given: (B, N) and (B, N) or
    None. One forward pass (`response_hidden`, which refuses prompt_len < 1), then the LM head chunk by
    chunk (`llmlab.train.losses.token_logprobs`: the (B, N, V) logits never exist at once); gradients
    flow unless the caller disables them."""
    B, total = sequences.shape
    n = total - prompt_len
    if n <= 0:
        empty = torch.zeros(B, 0, device=sequences.device)
        return empty, (empty.clone() if value_head is not None else None)
    scale = temperature if temperature > 0 else 1.0
    with autocast(sequences.device):
        hidden, values = response_hidden(model, sequences, prompt_len, attention_mask, value_head=value_head)
        logp = token_logprobs(hidden.reshape(B * n, -1), base_transformer(model).lm_head,
                              sequences[:, prompt_len:].reshape(-1), temperature=scale)
    return logp.float().view(B, n), (values.float() if values is not None else None)


# --------------------------------------------------------------------------------------------------
# The reference policy
# --------------------------------------------------------------------------------------------------


class Reference:
    """The frozen reference policy. `active()` yields the module to run: a separate frozen model, or the
    LoRA policy itself with its adapter disabled for the duration of the block."""

    def __init__(self, policy: nn.Module, model: nn.Module | None = None) -> None:
        self.policy = policy
        self.model = model

    @property
    def shares_policy(self) -> bool:
        """True when the reference is the policy with its adapter disabled (no second copy)."""
        return self.model is None

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        if self.model is not None:
            yield self.model
            return
        with unwrap_model(self.policy).disable_adapter():
            yield self.policy

    @torch.no_grad()
    def logprobs(self, sequences: Tensor, prompt_len: int, attention_mask: Tensor | None = None, *,
                 temperature: float = 1.0) -> Tensor:
        """`response_logprobs` under the reference (no gradient)."""
        with self.active() as model:
            logp, _ = response_logprobs(model, sequences, prompt_len, attention_mask, temperature=temperature)
        return logp


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with gradients off (in place)."""
    model.requires_grad_(False)
    return model.eval()


def build_reference(policy: nn.Module, reference_checkpoint: str | None = None,
                    device: str | torch.device | None = None) -> Reference:
    """The reference for `policy`: `reference_checkpoint` loaded and frozen when given; else the policy's
    starting weights, through `disable_adapter()` for a LoRA policy or a frozen deep copy otherwise.
    Call it before the first update."""
    from llmlab.checkpoint import load_model
    from llmlab.lora import is_lora_model

    if reference_checkpoint:
        return Reference(policy, frozen(load_model(reference_checkpoint, device=device or model_device(policy))))
    if is_lora_model(policy):
        return Reference(policy)
    return Reference(policy, frozen(copy.deepcopy(unwrap_model(policy))))


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
# Mini-batch updates shared by PPO and GRPO (and DPO's optimizer step)
# --------------------------------------------------------------------------------------------------


def minibatches(n: int, size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """A random permutation of range(n) cut into index tensors of `size` rows (one PPO epoch)."""
    order = torch.randperm(n, generator=generator)
    return [order[i : i + size] for i in range(0, n, size)]


def group_minibatches(n_groups: int, group_size: int, groups_per_batch: int,
                      generator: torch.Generator | None = None) -> list[Tensor]:
    """Like `minibatches`, but whole groups stay together (GRPO: each prompt's samples in one update)."""
    batches = []
    for groups in minibatches(n_groups, groups_per_batch, generator):
        rows = groups[:, None] * group_size + torch.arange(group_size)[None, :]  # (g, G)
        batches.append(rows.reshape(-1))
    return batches


def optimizer_update(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip_norm: float) -> float:
    """Clip the gradient norm of `params` (when clip_norm > 0), step, clear gradients. Returns the norm
    before clipping."""
    from llmlab.train.loop import grad_norm_and_clip

    norm = grad_norm_and_clip(list(params), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


LossFn = Callable[[Tensor], tuple[Tensor, dict[str, Any]]]
HessianFn = Callable[[Tensor], tuple[Callable[[], Any], int]]


@dataclass
class UpdateCount:
    """Optimizer updates of a run so far, skipped ones included. Sophia refreshes its Hessian after
    updates 0, k, 2k, ... of the run (not of each rollout batch); stages save `n` with their state, so a
    resumed run refreshes on the same updates."""

    n: int = 0


def rollout_hessian(policy: nn.Module, rollout: Rollout, temperature: float = 1.0) -> HessianFn:
    """Sophia's Gauss-Newton-Bartlett estimate for PPO and GRPO: `fn(rows) -> (closure, tokens)`, the
    closure running forward and backward of the GNB loss on the policy's response logits of those rows
    (at `temperature`, the distribution the updates train; the head on the response tokens only, in
    chunks: `gnb_rows_loss`), labels sampled from the policy itself, averaged over the `tokens` response
    tokens (prompt and padding excluded). Only the LM logits enter,
    so a value head gets no curvature estimate (Sophia moves it by lr * clip(m / eps, 1) = sign steps)."""

    def fn(rows: Tensor) -> tuple[Callable[[], Tensor], int]:
        mb = rollout.select(rows.to(rollout.logprobs.device))

        def closure() -> Tensor:
            rows = mb.response_mask.reshape(-1).nonzero().squeeze(1)  # the scored response tokens
            with autocast(mb.sequences.device):
                hidden, _ = response_hidden(policy, mb.sequences, mb.prompt_len, mb.attention_mask)
                loss = gnb_rows_loss(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),
                                     base_transformer(policy).lm_head, temperature=temperature if temperature > 0 else 1.0)
            loss.backward()
            return loss

        return closure, int(mb.response_mask.sum())

    return fn


def minibatch_updates(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip_norm: float,
                      batches: Iterable[Tensor], loss_fn: LossFn, *, hessian: HessianFn | None = None,
                      updates: UpdateCount | None = None) -> dict[str, float]:
    """One optimizer step per mini-batch of rows: `loss_fn(rows) -> (loss, stats)`. A non-finite loss
    skips its update (counted in `skipped_updates`). With Sophia, after each update that the run's count
    `updates` makes due (`llmlab.optim.refresh_hessian_if_due`), `hessian(rows)` gives the closure that
    refreshes its Hessian on the same rows. Returns the mean loss, gradient norm and stats over the updates
    made (loss = nan when none was)."""
    updates = updates if updates is not None else UpdateCount()
    sums: dict[str, float] = {}
    made = skipped = 0
    for rows in batches:
        index = updates.n
        updates.n += 1
        loss, stats = loss_fn(rows)
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        loss.backward()
        values = {"loss": float(loss.detach()), "grad_norm": optimizer_update(optimizer, params, clip_norm),
                  **{k: float(v) for k, v in stats.items()}}
        if hessian is not None:
            refresh_hessian_if_due(optimizer, index, lambda rows=rows: hessian(rows))
        made += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    out = {k: v / max(made, 1) for k, v in sums.items()}
    if made == 0:
        out["loss"] = float("nan")
    out["skipped_updates"] = skipped
    return out


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
