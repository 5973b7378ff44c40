# 350M parameters (GPT-3 Medium shape)
n_layer = 24
n_head = 16
n_embd = 1024
learning_rate = 3e-4
min_lr = 3e-5
