# The baseline the field quotes: GPT-2 124M to 3.28 val loss on FineWeb (modded-nanogpt's target; llm.c's GPT-2
# reproduction, whose recipe this is: GPT-2's architecture and tokenizer, AdamW, 10B tokens, 0.5M tokens a step).
# Not yet run on a GPU here: the 3.28 is the target, not a result of this code. On one node of 8 GPUs:
#   python data/fineweb/prepare.py --repo=HuggingFaceFW/fineweb --out_dir=data/fineweb10B  # ~28 GB down, 20 GB out
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_fineweb.py
# The prepare writes FineWeb's first 10,485,760 tokens (llm.c's and modded-nanogpt's validation tokens: documents in
# the same order, each after an end-of-text) to val_000000.bin; an evaluation draws 20 x 64 x 1024 x 8 = as many.
# Faster, untested here: the modern layout with Muon, as modded-nanogpt's first records (3.28 at ~5100 steps):
#   ... --layout=modern --qk_norm=True --optimizer=muon --learning_rate=3e-3 --lr_schedule=wsd --max_iters=5100
out_dir = "out-gpt2-fineweb"
wandb_project = "fineweb"
wandb_run_name = "gpt2-124M"
dataset = "fineweb10B"
layout = "gpt2"                      # learned positions, LayerNorm, GELU, tied head: GPT-2 itself
bias = True
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
batch_size = 64
block_size = 1024
gradient_accumulation_steps = 8      # with 8 GPUs one micro-batch each: 8 x 64 x 1024 = 524,288 tokens a step
max_iters = 19073                    # x 524,288 = 10B tokens, one pass over sample-10BT
lr_decay_iters = 19073
warmup_iters = 700
learning_rate = 6e-4
min_lr = 0.0
weight_decay = 0.1
eval_interval = 250
eval_iters = 20
log_interval = 10
compile = True
