# A Mixture-of-Experts GPT of the medium (760M, GPT-3 Large) shape on one node of 8 GPUs:
#   python data/fineweb/prepare.py                 # FineWeb-Edu sample-10BT as token shards in data/fineweb
#   torchrun --standalone --nproc_per_node=8 train.py config/medium_moe.py
# Every block's MLP becomes 8 SwiGLU experts, top-2, each half the dense width (2048 of 4096): a token uses as many
# parameters and FLOPs as in the dense medium model (0.76B active), the model holds 2.1B (python model.py
# config/medium_moe.py prints both). 16 x 1024 tokens x 32 accumulation steps = ~0.5M tokens per step.
wandb_log = False
wandb_project = "fineweb"
wandb_run_name = "medium-moe"
dataset = "fineweb"
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 4 * 8
n_layer = 24
n_head = 16
n_embd = 1536
n_expert = 8
top_k = 2
expert_hidden = 2048
aux_loss_coef = 0.01
z_loss_coef = 0.001
learning_rate = 2.5e-4
min_lr = 2.5e-5
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 100
log_interval = 10
weight_decay = 1e-1
grad_checkpoint = True  # 24 MoE blocks at 16 x 1024 tokens: recompute rather than hold every activation
compile = True
