# The DRE on pointer chasing (data/reasoning/prepare.py): trained on chains of depth 1-4, it is meant to follow
# deeper ones (up to 8) by running more core steps at test time. About 35 minutes on 2 CPU cores, one thread
# (0.6-0.7 s an iteration):
#   python data/reasoning/prepare.py && python train.py config/reasoning_dre.py
#   python bench.py --reasoning --out_dir=out-reasoning-dre     # accuracy per depth at 1..4x the training steps
# 1 prelude + 1 core + 1 coda block, so it has exactly the parameters of config/reasoning_dense.py. The core's
# updates land on the prelude's output (dre_inject) and r is drawn per step (mean 4, at most 8): README, "Reasoning
# benchmark". Neither this model nor the dense one got off the recall plateau in 3000 iterations (README).
out_dir = "out-reasoning-dre"
dataset = "reasoning"
eval_interval = 500
eval_iters = 10
log_interval = 25
always_save_checkpoint = True
batch_size = 32
block_size = 128
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
dre = True
n_prelude = 1
n_coda = 1
dre_inject = True
max_reasoning_steps = 8
dre_sample_steps = True
dre_mean_steps = 4.0
dre_backprop_steps = 8
dre_threshold = 1e-2  # the KL exit test (the default): the state test is cheaper but blind to difficulty (README)
optimizer = "muon"  # with qk_norm and a high rate: off the recall plateau in hundreds of steps, not thousands
qk_norm = True
learning_rate = 5e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
