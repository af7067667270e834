"""What a stage checkpoint holds besides DeepSpeed's own files (export reads these names)."""

STATE_FILE = "sinkd_state.json"  # progress counters and the per-step loss log
TASK_STATE_FILE = "task_state_rank{rank}.json"  # a task's per-rank state (causal_lm's replay buffer)
META_DIR = "hf_meta"  # the student's config, tokenizer and task file: what export needs besides weights
DS_TAG = "ds"  # DeepSpeed's checkpoint tag (its files live under <checkpoint>/ds)
