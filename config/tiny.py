# 125M parameters (GPT-3 Small / GPT-2 124M shape). Combine with a training config:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py config/tiny.py
n_layer = 12
n_head = 12
n_embd = 768
learning_rate = 6e-4
min_lr = 6e-5
