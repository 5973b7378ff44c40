# The best Tiny Shakespeare character model 2 CPU cores train in 10 minutes, start-up and evaluations included:
#   python data/shakespeare_char/prepare.py && python train.py config/speedrun_cpu.py
# val 1.469 in 568 s on this project's 2-core machine, against nanoGPT's 1.4697 on an A100.
# What each change bought is in the README ("Measured: dense training"); what did not pay at this size: dropout
# (1.7x the step), bf16 autocast (0.92-1.13x) and torch.compile (its ~40 s cost more than it saved).
out_dir = "out-speedrun-cpu"
eval_interval = 500
eval_iters = 20
log_interval = 250
always_save_checkpoint = False  # keep the best val loss
dataset = "shakespeare_char"
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
optimizer = "muon"      # orthogonalised updates for the blocks' matrices: fewer steps to the same loss
learning_rate = 3e-3
weight_decay = 0.3      # the model sees the training text ~8 times: stronger decay holds val loss off overfitting
max_iters = 3600        # 3800 took 557 s and 604 s in two runs: this leaves room for the machine's noise
lr_decay_iters = 3600
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
device = "cpu"
dtype = "float32"
compile = False
