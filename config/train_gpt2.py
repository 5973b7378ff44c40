# GPT-2 124M-class pretraining on FineWeb-Edu's 10B-token sample (token shards), one node of 8 GPUs:
#   python data/fineweb/prepare.py                 # downloads ~28 GB of Parquet, writes ~20 GB of shards
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# (any other corpus: data/fineweb/prepare.py YOUR_FILES --out_dir=data/NAME, or data/text/prepare.py, --dataset=NAME)
# 12 sequences x 1024 tokens x 40 accumulation steps = ~0.5M tokens per step; 600k steps = 300B tokens.
wandb_log = False
wandb_project = "fineweb"
wandb_run_name = "gpt2-124M"
dataset = "fineweb"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
n_layer = 12
n_head = 12
n_embd = 768
max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
compile = True
