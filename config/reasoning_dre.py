# The DRE on pointer chasing (data/reasoning/prepare.py): trained on chains of depth 1-4, it is meant to follow
# deeper ones (up to 8) by running more core steps at test time. 3 blocks of 128: one prelude block, a core of two
# and no coda (the head reads the core's state, so every hop has to be taken by the core), exactly the parameters of
# config/reasoning_dense.py; r is drawn per step (mean 4, at most 8). From scratch on depths 1-4 it stays at
# guessing on 2 CPU cores; by stages (README, "Reasoning benchmark"), each starting from the last one's weights, it
# follows depths 3-4 by running 2 or more steps, which the dense model cannot (depths 6-8 it does not). About an hour
# in all (one thread, 0.7-1.2 s an iteration); bash config/reasoning_dre_stages.sh runs them all:
#   python data/reasoning/prepare.py --train_max=1 --test_max=2 --out_dir=data/reasoning1
#   python data/reasoning/prepare.py --train_max=2 --test_max=4 --out_dir=data/reasoning2
#   python data/reasoning/prepare.py                                            # depths 1-4, tests 1-8
#   python train.py config/reasoning_dre.py --dataset=reasoning1 --out_dir=out-dre1 --max_iters=500 \
#       --lr_decay_iters=500 --dre_mean_steps=3 --max_reasoning_steps=6
#   python train.py config/reasoning_dre.py --dataset=reasoning2 --out_dir=out-dre2 --init_from=out-dre1 \
#       --max_iters=1000 --lr_decay_iters=1000 --warmup_iters=20 --dre_mean_steps=3 --max_reasoning_steps=6
#   python train.py config/reasoning_dre.py --out_dir=out-dre3 --init_from=out-dre2 --max_iters=1000 \
#       --lr_decay_iters=1000 --learning_rate=3e-3 --min_lr=1e-4 --warmup_iters=20
#   python train.py config/reasoning_dre.py --out_dir=out-dre4 --init_from=out-dre3 --max_iters=1500 \
#       --lr_decay_iters=1500 --learning_rate=2e-3 --min_lr=1e-4 --warmup_iters=20
#   python bench.py --reasoning --out_dir=out-dre4     # accuracy per depth at 1..4x the training steps
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
n_coda = 0  # 1 + 1 + 1 stopped at half of depth 2 at any step count; 1 + 2 + 0 measured best (README)
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
