"""Scoring responses for PPO and GRPO: the log-probs (and values) of response tokens under the policy and
the frozen reference policy.

    logp, values = response_logprobs(policy, sequences, prompt_len, attention_mask, value_head=head)
    reference = build_reference(policy, cfg.reference_checkpoint)
    ref_logp = reference.logprobs(sequences, prompt_len, attention_mask)

The log-probabilities are recomputed in ONE batched forward pass over prompt + response (the sampling
loop keeps no graph and its per-step logits would cost B x N x V memory), with the positions rebuilt
exactly as generation built them (left padding included), so at temperature 1 they equal the sampling
distribution's. The LM head then runs on the response positions only, chunk by chunk
(`llmlab.train.losses.token_logprobs`), so the (B, N, V) logits never exist at once.

Temperature: log-probs are those of logits / temperature, the distribution tokens were drawn from (top-k
and top-p filtering are ignored, as in TRL); the same scaling is used for the policy, its later updates
and the reference, so ratios and KL compare like with like.

The reference policy (`Reference`) is the policy's starting weights: with LoRA the same PeftModel with its
adapter disabled (no second copy in memory), without LoRA a frozen copy, or a separate checkpoint when
`reference_checkpoint` names one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.checkpoint import base_transformer, unwrap_model
from llmlab.device import autocast, model_device
from llmlab.errors import ConfigError, DataError
from llmlab.train.losses import token_logprobs

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


def check_reference_fits(policy_config: Any, reference_config: Any, where: str) -> None:
    """Refuse a reference_checkpoint with another vocabulary size than the policy's (read from its config,
    before any weight loads): it cannot score the policy's tokens (its embedding would index out of range,
    deep in the first forward pass)."""
    if reference_config.vocab_size != policy_config.vocab_size:
        raise ConfigError(f"reference_checkpoint: {where} has vocab_size={reference_config.vocab_size}, the policy "
                          f"{policy_config.vocab_size}; the reference must share the policy's tokenizer (leave "
                          f"reference_checkpoint null to use the policy's starting weights)")


def build_reference(policy: nn.Module, reference_checkpoint: str | None = None,
                    device: str | torch.device | None = None) -> Reference:
    """The reference for `policy`: `reference_checkpoint` loaded and frozen when given; else the policy's
    starting weights, through `disable_adapter()` for a LoRA policy or a frozen deep copy otherwise.
    Call it before the first update."""
    from llmlab.checkpoint import load_model, read_checkpoint
    from llmlab.lora import is_lora_model

    if reference_checkpoint:
        check_reference_fits(base_transformer(policy).config, read_checkpoint(reference_checkpoint).model_config,
                             reference_checkpoint)
        return Reference(policy, frozen(load_model(reference_checkpoint, device=device or model_device(policy))))
    if is_lora_model(policy):
        return Reference(policy)
    return Reference(policy, frozen(copy.deepcopy(unwrap_model(policy))))
