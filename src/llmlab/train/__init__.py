"""Training stages on one shared loop.

- `loop`: `train_loop` (accumulation, clipping, schedule, evaluation, checkpoints, exact resume, NaN
  handling, Ctrl-C/SIGTERM), `resume_state`, `forward_backward`, `evaluate`;
- `pretrain`: `run_pretrain` (base training; also `python -m llmlab.train.pretrain` for torchrun);
- `sft`: `run_sft` (supervised fine-tuning on chat data, full or LoRA; also `python -m llmlab.train.sft`);
- `stage`: what pretraining and SFT share around the loop (configs from checkpoints, resolved-config
  printout, tokenizer choice and checks, seeding, optimizer-switch check, the `python -m` entry);
- `losses`: chunked, token-weighted causal-LM cross entropy;
- `metrics`: progress bar, metrics.jsonl, TensorBoard, loss.png;
- `distributed`: torchrun process group, DDP / FSDP2 wrapping, rank-0 helpers.
"""
