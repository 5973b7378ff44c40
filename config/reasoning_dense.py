# The dense baseline of config/reasoning_dre.py: the same 3 blocks of 128 (the same parameters), each run once, on
# the same pointer-chasing data. About 18 minutes on 2 CPU cores, one thread (0.35 s an iteration):
#   python data/reasoning/prepare.py && python train.py config/reasoning_dense.py
#   python bench.py --reasoning --out_dir=out-reasoning-dense   # accuracy per depth (at 1 step: there is no core)
out_dir = "out-reasoning-dense"
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
optimizer = "muon"  # with qk_norm and a high rate: off the recall plateau in hundreds of steps, not thousands
qk_norm = True
learning_rate = 5e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
