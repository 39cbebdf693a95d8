# pico-decoder-tiny: the suite's recipe (pico-train's defaults: 12 layers, 12 heads, 4 KV heads,
# global batch 1024 x 2048 tokens of pretokenized-dolma, AdamW 3e-4, 2,500 warm-up steps, linear
# decay to 0 at 200,000 steps, a checkpoint every 1,000); only the width differs across sizes.
model.d_model = 96
model.activation_hidden_dim = 384
checkpointing.run_name = "pico-decoder-tiny"
# Four micro-steps keep a micro-batch at 16 x 2048 tokens per GPU on the suite's 16 GPUs; the
# gradient is the same for any split, up to float rounding.
training.optimization.gradient_accumulation_steps = 4
