# Fine-tunes the CPU default model (out-shakespeare-char, from config/train_shakespeare_char.py) on conversations:
# the SFT and DPO stages of constitution.py's pipeline. The command names the stage, its data and its run:
#   python train.py config/finetune_shakespeare_char.py --mode=sft --train_jsonl=data/constitutions/chat_demo.jsonl \
#       --out_dir=out-sft
#   python train.py config/finetune_shakespeare_char.py --mode=dpo --init_from=out-sft --train_jsonl=prefs.jsonl \
#       --out_dir=out-dpo
# Each run starts from init_from's weights at iter 0 with a fresh optimizer; dpo's reference is those same weights.
dataset = "shakespeare_char"     # for its tokenizer (meta.json); the examples come from train_jsonl
init_from = "out-shakespeare-char"
batch_size = 16
block_size = 128                 # the base model's window; longer conversations keep their last 128 characters
learning_rate = 3e-4
max_iters = 40                   # the demo sets have a few dozen examples: val loss is lowest after ~10-20 steps
lr_decay_iters = 40
warmup_iters = 5
min_lr = 3e-5
weight_decay = 0.0               # a few dozen steps: nothing to regularise toward zero
eval_interval = 10
eval_iters = 10
log_interval = 10
always_save_checkpoint = False   # keep the checkpoint with the best val loss
