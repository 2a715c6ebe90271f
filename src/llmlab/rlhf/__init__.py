"""RLHF: PPO, DPO and GRPO on LLM-Lab policies, full or LoRA.

    llm-lab rlhf --config rlhf_config.json algorithm=grpo

- `losses`      the maths as pure functions: masked statistics, KL estimators, PPO (token rewards, GAE,
                clipped losses, explained variance, KL controllers), DPO and GRPO losses
- `rewards`     reward functions (`module:function`, built-ins) and the HF reward model, combined
- `scoring`     log-probs (and values) of response tokens in one forward pass, the LM head in chunks;
                the reference policy (disabled adapter or frozen copy)
- `rollout`     batched KV-cache sampling scored by the policy and the reference, prompt data and
                greedy evaluation
- `updates`     the mini-batch update loop PPO and GRPO share (`minibatch_updates`: clipping, Sophia's
                Hessian refresh on the response tokens), the run's update count
- `value_head`  PPO's critic on the policy's final hidden states
- `ppo`, `dpo`, `grpo`   each algorithm's update on tensors, and its stage for the run loop
- `run`         `run_rlhf(cfg, resume=..., progress=...)`: setup, loop, checkpoints, resume, signals
"""
