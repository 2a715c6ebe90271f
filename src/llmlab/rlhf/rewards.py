"""Reward sources for PPO and GRPO, combined into one function ``(prompts, completions, **columns)``.

A reward is a plain function ``fn(prompts, completions, **columns) -> list[float]``: one float per
completion. ``columns`` are the other fields of the prompt dataset's records (for example ``answer``),
one list per field, aligned with ``prompts``. Three kinds of source exist:

- built-ins, named by a short name in ``reward_functions`` (see ``BUILTIN_REWARDS``):
  ``exact_match``, ``numeric_match``, ``format_final_line``, ``length_penalty``;
- user functions named ``"module:function"`` (the module is imported from ``sys.path``) or
  ``"path/to/file.py:function"`` (that file is loaded); nothing else is imported;
- a Hugging Face sequence-classification reward model (``reward_model_name``), see ``RewardModel``.

``build_reward_fn(cfg, device)`` combines them as a weighted sum:
``total = sum_i weight_i * reward_i``; items of ``reward_functions`` are either a spec string
(weight 1) or ``{"name": spec, "weight": w}``, and the reward model gets ``reward_model_weight``.

Reference answers: the built-ins that need one read the ``answer`` column. When
``reward_answer_column`` names another column, that column is also passed as ``answer``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llmlab.config import RLHFConfig
from llmlab.errors import ConfigError

RewardFn = Callable[..., Sequence[float]]

# --------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------

# Integers (with optional thousands commas), decimals and exponents: "-3", "1,234", "0.5", ".5", "1e-3".
_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
)
_FINAL_LINE = re.compile(
    r"^(?:(?:final\s+)?answer\s*(?:is)?\s*[:=]?|the\s+answer\s+is\s*:?|####)?\s*"
    rf"\$?(?:{_NUMBER.pattern})\$?\s*\.?$",
    re.IGNORECASE,
)


def _need_answers(name: str, answer: Sequence[Any] | None, n: int,
                  prompts: Sequence[str] = ()) -> Sequence[Any]:
    if answer is None:
        raise ConfigError(
            f"reward_functions: {name} needs a reference column 'answer' in the prompt data "
            f"(or set reward_answer_column to the column that holds the reference answers)"
        )
    if len(answer) != n:
        raise ConfigError(f"reward_functions: {name} got {len(answer)} answers for {n} completions")
    missing = [i for i, a in enumerate(answer) if a is None]
    if missing:  # a record without the column (one of mixed datasets): it was compared with the text "None"
        prompt = " ".join(str(prompts[missing[0]]).split()) if len(prompts) > missing[0] else "?"
        prompt = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise ConfigError(
            f"reward_functions: {name} needs a reference answer for every prompt, but {len(missing)} of {n} have "
            f"none (e.g. {prompt!r}); give every prompt dataset that column, or set reward_answer_column"
        )
    return answer


def _normalise_text(text: Any) -> str:
    return " ".join(str(text).split())


def last_number(text: Any) -> float | None:
    """The last number written in ``text`` (commas as thousands separators allowed), or None."""
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """1.0 when the completion equals the reference answer after stripping and collapsing whitespace
    (case-sensitive), else 0.0. Reads the ``answer`` column."""
    answer = _need_answers("exact_match", answer, len(completions), prompts)
    return [float(_normalise_text(c) == _normalise_text(a)) for c, a in zip(completions, answer)]


def numeric_match(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """1.0 when the LAST number in the completion equals the last number in the reference answer
    (relative tolerance 1e-6), else 0.0 (also when the completion has no number).

    Taking the last number lets a response reason first and state the result at the end; taking the
    reference's last number accepts GSM8K-style answers ("... #### 72") as well as bare numbers.
    """
    answer = _need_answers("numeric_match", answer, len(completions), prompts)
    scores = []
    for completion, reference in zip(completions, answer):
        got, want = last_number(completion), last_number(reference)
        ok = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
        scores.append(float(ok))
    return scores


def format_final_line(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """1.0 when the last non-empty line of the completion states a single number, optionally after
    "Answer:", "Final answer:", "The answer is" or "####" (e.g. "Answer: 42."), else 0.0.

    A format reward: it checks that the answer is stated where ``numeric_match`` will look for it,
    without a reference column.
    """
    scores = []
    for completion in completions:
        lines = [line.strip() for line in str(completion).splitlines() if line.strip()]
        scores.append(float(bool(lines) and _FINAL_LINE.match(lines[-1]) is not None))
    return scores


def length_penalty(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """-(number of characters) / 1000: a gentle push towards shorter answers; scale it with a weight."""
    return [-len(str(c)) / 1000.0 for c in completions]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "format_final_line": format_final_line,
    "length_penalty": length_penalty,
}

# --------------------------------------------------------------------------------------------------
# User functions: "module:function" or "path/to/file.py:function"
# --------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _import_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"reward_functions: {spec!r}: file {path} not found")
    module_name = f"llmlab_user_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward_functions: {spec!r}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any failure becomes one clear line
        del sys.modules[module_name]
        raise ConfigError(f"reward_functions: {spec!r}: loading {path} failed ({_one_line(e)})") from None
    return module


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing_is_named = e.name is None or module_name == e.name or module_name.startswith(e.name + ".")
        if not missing_is_named:
            raise ConfigError(
                f"reward_functions: {spec!r}: module {module_name!r} imports {e.name!r}, which is not installed"
            ) from None
        raise ConfigError(
            f"reward_functions: {spec!r}: no module named {module_name!r}; put it on PYTHONPATH (or in the "
            f"working directory) or give a file as path/to/file.py:function"
        ) from None
    except Exception as e:  # the user's code: any failure becomes one clear line
        raise ConfigError(
            f"reward_functions: {spec!r}: importing {module_name!r} failed ({_one_line(e)})"
        ) from None


def load_reward_function(spec: str) -> RewardFn:
    """Resolve a reward spec to a callable: a built-in name, ``"module:function"`` or
    ``"path/to/file.py:function"``.

    Only the module the spec names is imported (``importlib.import_module``) or, for a ``.py`` path,
    only that file is executed. Every failure is a one-line ``ConfigError`` naming the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"reward_functions: expected a name like 'module:function', got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ConfigError(
            f"reward_functions: {spec!r} is not a built-in ({', '.join(BUILTIN_REWARDS)}) and not of the "
            f"form 'module:function' or 'path/to/file.py:function'"
        )
    module_part, attr_path = spec.rsplit(":", 1)
    if not module_part or not attr_path:
        raise ConfigError(f"reward_functions: {spec!r}: expected 'module:function'")
    if module_part.endswith(".py"):
        module = _import_file(module_part, spec)
    else:
        module = _import_module(module_part, spec)
    obj: Any = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"reward_functions: {spec!r}: {module_part} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(
            f"reward_functions: {spec!r}: {attr_path} is a {type(obj).__name__}, not a function"
        )
    return obj


# --------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------

_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n<]*)\n?(.*?)(?=<\|im_start\|>|\Z)", re.DOTALL)
_CHAT_TOKENS = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>")


def chatml_to_plain(text: str, generation_tag: bool = True) -> str:
    """Turn a ChatML-rendered prompt into plain text a reward model understands.

    ``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n`` becomes ``"User: Hi\\nAssistant:"``
    (one "Role: text" line per turn; the open assistant turn becomes a bare "Assistant:" when
    ``generation_tag``, and is dropped otherwise). Text without ChatML markers is returned with any
    stray chat tokens removed, so raw-text prompts pass through unchanged.
    """
    if "<|im_start|>" not in text:
        return _CHAT_TOKENS.sub("", text).strip()
    lines = []
    for role, body in _CHATML_TURN.findall(text):
        body = _CHAT_TOKENS.sub("", body).strip()
        role = role.strip().capitalize() or "User"
        if body:
            lines.append(f"{role}: {body}")
        elif generation_tag:
            lines.append(f"{role}:")
    return "\n".join(lines)


def plain_turns(messages: Sequence[dict[str, Any]]) -> str:
    """A conversation as the "Role: text" lines `chatml_to_plain` makes of its ChatML rendering."""
    lines = []
    for m in messages:
        body = _CHAT_TOKENS.sub("", str(m.get("content") or "")).strip()
        if body:
            lines.append(f"{str(m.get('role') or 'user').strip().capitalize()}: {body}")
    return "\n".join(lines)


class RewardModel:
    """A frozen Hugging Face sequence-classification model that scores (prompt, response) pairs.

    Loaded with ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` from a hub id or a local
    folder, put in eval mode with gradients off, on ``device``.

    Scoring: each pair is tokenized as a text pair, ``tokenizer(prompt, response, truncation=True)``,
    which is how reward models such as OpenAssistant/reward-model-deberta-v3-large-v2 are trained
    (question, answer); the longer of the two is truncated first when the pair passes ``max_length``.
    Prompts become plain "Role: text" lines (from their turns when given, else ``chatml_to_plain(...,
    generation_tag=False)`` of the ChatML text) and responses lose stray chat tokens, so the model sees
    plain text. The score is the single logit when the model has one label;
    with two or more labels it is the log-odds of the last label, log p_last - log(1 - p_last) (for
    two labels: logit_1 - logit_0).
    """

    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        max_length: int = 512,
        num_labels: int | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from llmlab.interop.hf_io import pickle_only_folder, pickle_refused

        kwargs = {} if num_labels is None else {"num_labels": num_labels}
        if pickle_only_folder(name_or_path):
            raise ConfigError(f"reward_model_name: {pickle_refused(name_or_path)}")
        from llmlab.hub import hub_kwargs

        kwargs.update(hub_kwargs(name_or_path))  # offline: the local cache only, at once
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs(name_or_path))
            # safetensors only: a pytorch_model.bin is never unpickled
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, use_safetensors=True,
                                                                            **kwargs)
        except (OSError, ValueError, KeyError) as e:
            if "use_safetensors" in str(e):  # a hub model that publishes no safetensors
                raise ConfigError(f"reward_model_name: {pickle_refused(name_or_path)}") from None
            raise ConfigError(
                f"reward_model_name: cannot load {name_or_path!r} as a sequence-classification model "
                f"({_one_line(e)}); give a local folder or a reachable hub id, or set it to null and use "
                f"reward_functions"
            ) from None
        if self.tokenizer.pad_token is None:  # GPT-style reward models have no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        limit = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = min(max_length, limit)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str],
              messages: Sequence[list[dict[str, Any]] | None] | None = None) -> list[float]:
        """One float per (prompt, response) pair, computed in batches of ``batch_size``. ``messages`` (the
        prompts' turns, `prompt_messages` of `data.prompts`) give each prompt as plain "Role: text" lines
        whatever template rendered it; without them a rendered prompt goes through ``chatml_to_plain``,
        which reads ChatML only (a Llama-3 or Mistral template's markup would reach the reward model)."""
        if len(prompts) != len(responses):
            raise ValueError(f"RewardModel.score: {len(prompts)} prompts but {len(responses)} responses")
        plain = [plain_turns(m) if m else chatml_to_plain(p, generation_tag=False)
                 for p, m in zip(prompts, messages or [None] * len(prompts))]
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = plain[start : start + self.batch_size]
            batch_responses = [
                _CHAT_TOKENS.sub("", r).strip() for r in responses[start : start + self.batch_size]
            ]
            encoded = self.tokenizer(
                batch_prompts,
                batch_responses,
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**encoded).logits.float()  # (b, num_labels)
            scores.extend(self.logits_to_scores(logits).tolist())
        return scores

    @staticmethod
    def logits_to_scores(logits: torch.Tensor) -> torch.Tensor:
        """(b, num_labels) -> (b,): the single logit, or the last label's log-odds for 2+ labels."""
        if logits.shape[-1] == 1:
            return logits[:, 0]
        log_probs = torch.log_softmax(logits, dim=-1)
        return log_probs[:, -1] - torch.logsumexp(log_probs[:, :-1], dim=-1)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 prompt_messages: Sequence[list[dict[str, Any]] | None] | None = None, **_: Any) -> list[float]:
        return self.score(prompts, completions, prompt_messages)


# --------------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------------


def _accepted_columns(fn: RewardFn, columns: dict[str, Any]) -> dict[str, Any]:
    """The columns ``fn`` can take: all of them if it has ``**kwargs``, else only its named parameters."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in names}


class CombinedReward:
    """The weighted sum of several reward sources; calling it returns one float per completion.

    ``sources`` is a list of (name, weight, fn). After each call, ``last_breakdown`` maps every source
    name to its unweighted per-sample rewards, for logging.
    """

    def __init__(self, sources: list[tuple[str, float, RewardFn]], answer_column: str | None = None) -> None:
        if not sources:
            raise ConfigError(
                "reward_functions: no reward source; list reward_functions or set reward_model_name"
            )
        self.sources = sources
        self.answer_column = answer_column
        self.last_breakdown: dict[str, list[float]] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward: {len(prompts)} prompts but {n} completions")
        if self.answer_column is not None:
            if self.answer_column not in columns:
                raise ConfigError(
                    f"reward_answer_column: column {self.answer_column!r} is not in the prompt data "
                    f"(columns: {', '.join(sorted(columns)) or 'none'})"
                )
            columns = {**columns, "answer": columns[self.answer_column]}
        totals = [0.0] * n
        breakdown: dict[str, list[float]] = {}
        for name, weight, fn in self.sources:
            values = fn(list(prompts), list(completions), **_accepted_columns(fn, columns))
            if isinstance(values, torch.Tensor):
                values = values.detach().flatten().tolist()
            if len(values) != n:
                raise ConfigError(
                    f"reward_functions: {name} returned {len(values)} rewards for {n} completions"
                )
            values = [float(v) for v in values]
            breakdown[name] = values
            totals = [t + weight * v for t, v in zip(totals, values)]
        self.last_breakdown = breakdown
        return totals


def parse_reward_items(items: Sequence[Any]) -> list[tuple[str, float]]:
    """``reward_functions`` entries -> (spec, weight): a string has weight 1; a dict is
    ``{"name": spec, "weight": w}`` (weight optional)."""
    parsed = []
    for item in items:
        if isinstance(item, str):
            parsed.append((item, 1.0))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "weight"})
            if unknown or "name" not in item:
                raise ConfigError(
                    f"reward_functions: {item!r}: expected {{'name': 'module:function', 'weight': 1.0}}"
                    + (f" (unknown key(s): {', '.join(unknown)})" if unknown else "")
                )
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigError(
                    f"reward_functions: {item['name']!r}: weight must be a number, got {weight!r}"
                )
            parsed.append((item["name"], float(weight)))
        elif callable(item):  # a Python object: the run's config is JSON, so it is named, not stored
            name = getattr(item, "__name__", type(item).__name__)
            raise ConfigError(
                f"reward_functions: {name!r} is a Python object, which the run's saved config cannot hold; define "
                f"it at module level and name it 'module:{name}' ('__main__:{name}' from the running script)"
            )
        else:
            raise ConfigError(
                f"reward_functions: expected a string or {{'name', 'weight'}} object, got {item!r}"
            )
    return parsed


def build_reward_fn(cfg: RLHFConfig, device: str | torch.device = "cpu") -> CombinedReward:
    """The combined reward of an RLHF config: every ``reward_functions`` entry with its weight, plus
    the reward model ``reward_model_name`` weighted by ``reward_model_weight`` (not loaded when that
    weight is 0). Raises ConfigError when there is no source at all."""
    sources: list[tuple[str, float, RewardFn]] = []
    names: set[str] = set()
    for spec, weight in parse_reward_items(cfg.reward_functions):
        name = spec if spec not in names else f"{spec}#{len(sources)}"
        names.add(name)
        sources.append((name, weight, load_reward_function(spec)))
    if cfg.reward_model_name and cfg.reward_model_weight != 0:
        try:
            model = RewardModel(cfg.reward_model_name, device)
        except ConfigError as e:
            if not sources:
                raise
            # reward_model_name keeps its (hub) default unless set to null: say so where functions are given
            raise ConfigError(f"{e}. reward_functions are set too, and the reward model is added to them: set "
                              f"reward_model_name=null to score with the functions alone") from None
        sources.append(("reward_model", cfg.reward_model_weight, model))
    return CombinedReward(sources, answer_column=cfg.reward_answer_column)
