# config/train_shakespeare_char.py with each MLP replaced by 8 experts, top-2, each half the dense MLP's width: the
# same active parameters and FLOPs per token, 4x the MLP parameters (docs/moe.md compares the two):
#   python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_moe.py
from pathlib import Path
exec(Path(__file__).with_name("train_shakespeare_char.py").read_text())
out_dir = "out-shakespeare-char-moe"
n_expert = 8
top_k = 2
expert_hidden = 160  # 2 x 160 = the dense MLP's 320
moe_balance = "bias"  # aux-loss-free balancing (DeepSeek-V3) on top of the aux loss; Mixtral export needs 'aux'
