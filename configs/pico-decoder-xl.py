# pico-decoder-xl: 1,166,139,648 parameters, the 1B end of the suite, on the suite's recipe
# (pico-train's defaults: 12 layers, 12 heads, 4 KV heads, global batch 1024 x 2048 tokens of
# pretokenized-dolma, AdamW 3e-4, 2,500 warm-up steps, linear decay to 0 at 200,000 steps);
# only the width grows: d_model 2304 (head dim 192), MLP 4 x d_model.
model.d_model = 2304
model.activation_hidden_dim = 9216
checkpointing.run_name = "pico-decoder-xl"
# Eight micro-steps keep a micro-batch at 8 x 2048 tokens per GPU on the suite's 16 GPUs: about
# 54 GB per GPU under DDP (python bench.py --memory --model xl --seq-len 2048). On 40 GB GPUs,
# keep only each block's input and recompute the rest in the backward (about 26 GB):
#   training.activation_checkpointing = True
training.optimization.gradient_accumulation_steps = 8
