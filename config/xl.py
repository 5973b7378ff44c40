# 2.7B parameters (GPT-3 2.7B shape); needs sharding (FSDP) or grad_checkpoint=True to fit most GPUs
n_layer = 32
n_head = 32
n_embd = 2560
learning_rate = 1.6e-4
min_lr = 1.6e-5
