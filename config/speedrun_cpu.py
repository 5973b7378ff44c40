# The best Tiny Shakespeare character model 2 CPU cores train in 10 minutes, start-up and evaluations included
# (docs/results.md, "Dense training": what each change bought, and what did not pay at this size):
#   python data/shakespeare_char/prepare.py && python train.py config/speedrun_cpu.py
from pathlib import Path
exec(Path(__file__).with_name("train_shakespeare_char.py").read_text())
out_dir = "out-speedrun-cpu"
eval_interval = 500
log_interval = 250
optimizer = "muon"      # orthogonalised updates for the blocks' matrices: fewer steps to the same loss
learning_rate = 3e-3
weight_decay = 0.3      # the model sees the training text ~8 times: stronger decay holds val loss off overfitting
max_iters = 3600        # leaves room for the machine's noise under 10 minutes
lr_decay_iters = 3600
device = "cpu"
dtype = "float32"
compile = False
