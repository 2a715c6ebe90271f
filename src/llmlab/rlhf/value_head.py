"""PPO's critic: a linear value head on the policy's final (normed) hidden states.

    head = ValueHead(model.config.d_model)
    logp, values = response_logprobs(model, seqs, prompt_len, value_head=head)   # values (B, N)

The head shares the policy's trunk (as in InstructGPT-style PPO with a value head): one forward pass
gives both the token log-probs and the values, and the value loss (weighted by vf_coef) also shapes the
trunk. With LoRA only the adapters and this head train. The head is stored beside the checkpoint as
`value_head.safetensors`, so PPO resumes with its critic; the policy checkpoint itself stays a plain
LLM-Lab checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmlab.errors import CheckpointError

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """hidden (B, T, D) -> values (B, T). Starts at zero output, so the first advantages are the
    rewards themselves and early value errors do not dominate the loss."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden).squeeze(-1)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / VALUE_HEAD_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    def load(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / VALUE_HEAD_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder}: {VALUE_HEAD_FILE} is missing, so PPO cannot resume its value head; "
                                  f"resume from a PPO checkpoint or start a new run")
        state = load_file(str(path))
        try:
            self.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(f"{path}: the value head does not fit this model (d_model "
                                  f"{self.proj.in_features}); resume with the policy it was trained with") from None


def value_head_for(model: nn.Module) -> ValueHead:
    """A zero-initialised head sized for `model` (any wrapper), on its device."""
    from llmlab.checkpoint import base_transformer

    head = ValueHead(base_transformer(model).config.d_model)
    return head.to(next(model.parameters()).device)

