# A character-level GPT with the Dynamic Reasoning Engine (reasoning.py) on Tiny Shakespeare, sized for a laptop CPU
# (about 13 minutes on 2 cores, val loss ~1.60):
#   python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_dre.py
#   python bench.py --dre --out_dir=out-shakespeare-char-dre    # val loss and generation speed per step count
# config/train_shakespeare_char.py's width with 3 distinct blocks: 1 prelude, 1 core run r times, 1 coda, so it has
# exactly the parameters of a dense 3-block model. r is drawn per step (mean 4, at most 6), all steps with gradients;
# an iteration costs about twice the dense model's. At this size the recurrence does not beat that dense model (README):
# the core's predictions settle within 2-3 steps, and adaptive exit at dre_threshold=1e-2 runs ~2.7 core steps per
# token of the 6 for the same val loss.
out_dir = "out-shakespeare-char-dre"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
dataset = "shakespeare_char"
batch_size = 16
block_size = 128
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
dre = True
n_prelude = 1
n_coda = 1
max_reasoning_steps = 6
dre_sample_steps = True
dre_mean_steps = 4.0
dre_backprop_steps = 6
dre_threshold = 1e-2
learning_rate = 2e-3
max_iters = 1800
lr_decay_iters = 1800
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
