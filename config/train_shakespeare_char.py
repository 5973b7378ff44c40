# A character-level GPT on Tiny Shakespeare, sized for a laptop CPU (minutes on 2 cores; docs/results.md):
#   python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char.py
# nanoGPT's CPU recipe (--n_layer=4 --n_embd=128 --block_size=64 --batch_size=12 --max_iters=2000 ...) runs on top
# of this file unchanged. At this size fp32 beats bf16 autocast, and compiling does not pay.
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False  # the model overfits if trained much longer: keep the best val loss
dataset = "shakespeare_char"
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3  # tiny models take a high learning rate
max_iters = 1800
lr_decay_iters = 1800
min_lr = 2e-4
beta2 = 0.99  # a little more averaging: few tokens per step
warmup_iters = 100
