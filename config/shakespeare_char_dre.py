# config/train_shakespeare_char.py's width with the Dynamic Reasoning Engine (reasoning.py): 3 distinct blocks, 1
# prelude, 1 core run r times, 1 coda, so exactly the parameters of a dense 3-block model. r is drawn per step (mean
# 4, at most 6), all steps with gradients; an iteration costs about twice the dense model's (docs/reasoning.md):
#   python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_dre.py
#   python bench.py depth --out_dir=out-shakespeare-char-dre    # val loss and generation speed per step count
from pathlib import Path
exec(Path(__file__).with_name("train_shakespeare_char.py").read_text())
out_dir = "out-shakespeare-char-dre"
n_layer = 3
dre = True
n_prelude = 1
n_coda = 1
max_reasoning_steps = 6
dre_sample_steps = True
dre_mean_steps = 4.0
dre_backprop_steps = 6
dre_threshold = 1e-2
