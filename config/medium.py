# 760M parameters (GPT-3 Large shape)
n_layer = 24
n_head = 16
n_embd = 1536
learning_rate = 2.5e-4
min_lr = 2.5e-5
