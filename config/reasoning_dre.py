# The DRE on pointer chasing (data/reasoning/prepare.py): trained on chains of depth 1-4, it is meant to follow
# deeper ones (up to 8) by running more core steps at test time. About 35 minutes on 2 CPU cores, one thread
# (0.6-0.7 s an iteration):
#   python data/reasoning/prepare.py && python train.py config/reasoning_dre.py
#   python bench.py --reasoning --out_dir=out-reasoning-dre     # accuracy per depth at 1..4x the training steps
# 1 prelude + 1 core + 1 coda block, so it has exactly the parameters of config/reasoning_dense.py; r is drawn per
# step (mean 4, at most 8). On depths 1-4 from scratch it stays at guessing; what got furthest is by stages (README,
# "Reasoning benchmark"): depth 1 at a fixed 2 steps, then depths 1-2 at 3 steps from those weights:
#   python data/reasoning/prepare.py --train_max=1 --test_max=2 --out_dir=data/reasoning1   # and 2, 4: reasoning2
#   python train.py config/reasoning_dre.py --dataset=reasoning1 --out_dir=out-dre1 --max_iters=600 \
#       --lr_decay_iters=600 --dre_sample_steps=False --max_reasoning_steps=2
#   python train.py config/reasoning_dre.py --dataset=reasoning2 --out_dir=out-dre2 --init_from=out-dre1 \
#       --max_iters=750 --lr_decay_iters=750 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=20 \
#       --dre_sample_steps=False --max_reasoning_steps=3
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
dre_inject = False  # injection kept the depth-1 lookup from forming here: 58% against 100% (README)
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
