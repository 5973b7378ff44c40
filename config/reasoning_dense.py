# The dense baseline of config/reasoning_dre.py: the same 3 blocks of 128 (the same parameters), each run once, on
# the same pointer-chasing data. About 18 minutes on 2 CPU cores, one thread (0.35 s an iteration):
#   python data/reasoning/prepare.py && python train.py config/reasoning_dense.py
#   python bench.py reasoning --out_dir=out-reasoning-dense   # accuracy per depth (at 1 step: there is no core)
# From scratch on depths 1-4 it stays at guessing; by stages (data as in config/reasoning_dre.py; what each
# learns is in docs/reasoning.md):
#   python train.py config/reasoning_dense.py --dataset=reasoning1 --out_dir=out-dense1 --max_iters=500 \
#       --lr_decay_iters=500
#   python train.py config/reasoning_dense.py --dataset=reasoning2 --out_dir=out-dense2 --init_from=out-dense1 \
#       --max_iters=750 --lr_decay_iters=750 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=20
#   python train.py config/reasoning_dense.py --dataset=reasoning2 --out_dir=out-dense3 --init_from=out-dense2 \
#       --max_iters=1000 --lr_decay_iters=1000 --learning_rate=2e-3 --min_lr=1e-4 --warmup_iters=20
#   python train.py config/reasoning_dense.py --out_dir=out-dense4 --init_from=out-dense3 --max_iters=1500 \
#       --lr_decay_iters=1500 --learning_rate=2e-3 --min_lr=1e-4 --warmup_iters=20
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
optimizer = "muon"  # with qk_norm and a high rate: off the recall plateau sooner (docs/reasoning.md)
qk_norm = True
learning_rate = 5e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
