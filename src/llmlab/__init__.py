"""LLM-Lab: configure, pretrain, fine-tune (full or LoRA), align (PPO, DPO, GRPO) and chat with a transformer.

    from llmlab import ModelConfig, build_model, load_model
    from llmlab.generate import generate   # `llmlab.generate` is the module (KV-cache engine, samplers)
"""

from llmlab.config import ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.errors import LLMLabError

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TrainConfig", "SFTConfig", "RLHFConfig", "LLMLabError", "build_model", "load_model",
           "__version__"]


def __getattr__(name: str):  # lazy: `import llmlab` stays light for the CLI's --help
    if name == "build_model":
        from llmlab.model import build_model

        return build_model
    if name == "load_model":
        from llmlab.checkpoint import load_model

        return load_model
    raise AttributeError(name)


def __dir__() -> list[str]:  # the lazy names too, for tab completion (IPython, Jupyter)
    return sorted(set(globals()) | set(__all__))
