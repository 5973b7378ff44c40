# 1.3B parameters (GPT-3 XL shape); consider grad_checkpoint=True on 40 GB GPUs
n_layer = 24
n_head = 16
n_embd = 2048
learning_rate = 2e-4
min_lr = 2e-5
