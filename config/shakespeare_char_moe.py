# A character-level Mixture-of-Experts GPT on Tiny Shakespeare, sized for a laptop CPU (a few minutes on 2 cores):
#   python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_moe.py
# config/train_shakespeare_char.py with each MLP replaced by 8 experts, top-2, each half the dense MLP's width:
# the same active parameters and FLOPs per token, 4x the MLP parameters. README has the measured comparison.
out_dir = "out-shakespeare-char-moe"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
dataset = "shakespeare_char"
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
n_expert = 8
top_k = 2
expert_hidden = 160  # 2 x 160 = the dense MLP's 320
moe_balance = "bias"  # aux-loss-free balancing (DeepSeek-V3): balance ~0.98 here, ~0.75 with the aux loss alone
learning_rate = 2e-3
max_iters = 1800
lr_decay_iters = 1800
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
