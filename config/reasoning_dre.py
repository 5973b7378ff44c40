# The DRE on pointer chasing (data/reasoning/prepare.py): trained on chains of depth 1-4, it is meant to follow
# deeper ones (up to 8) by running more core steps at test time. 3 blocks of 128: one prelude block, a core of two
# and no coda (the head reads the core's state, so every hop has to be taken by the core), exactly the parameters of
# config/reasoning_dense.py; r is drawn per step (mean 4, at most 8). From scratch on depths 1-4 it stays at
# guessing on 2 CPU cores; it learns by stages, each starting from the last one's weights (docs/reasoning.md: what
# each stage reaches, and the variants tried); bash config/reasoning_dre_stages.sh runs them all:
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
#   python bench.py reasoning --out_dir=out-dre4     # accuracy per depth at 1..4x the training steps
from pathlib import Path
exec(Path(__file__).with_name("reasoning_dense.py").read_text())
out_dir = "out-reasoning-dre"
dre = True
n_prelude = 1
n_coda = 0  # the head reads the core's state: every hop is the core's (1 + 2 + 0 measured best)
dre_inject = False  # injection kept the depth-1 lookup from forming here (docs/reasoning.md)
max_reasoning_steps = 8
dre_sample_steps = True
dre_mean_steps = 4.0
dre_backprop_steps = 8
dre_threshold = 1e-2  # the KL exit test (the default); the state test is cheaper (docs/reasoning.md)
