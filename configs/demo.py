# pico-train's demo (its configs/demo.yaml): the tiny pico-decoder on pico-lm/pretokenized-dolma
# for 100 steps.
#   torchrun --nproc_per_node=8 train.py configs/demo.py
model.d_model = 96
model.activation_hidden_dim = 384

data.dataloader.batch_size = 32
training.max_steps = 100
training.optimization.lr = 1e-3
training.optimization.lr_warmup_steps = 30
training.optimization.gradient_accumulation_steps = 2
checkpointing.run_name = "pico-decoder-demo-1"
checkpointing.save_every_n_steps = 50
checkpointing.learning_dynamics.batch_size = 16
evaluation.paloma.batch_size = 32
monitoring.logging.log_every_n_steps = 10
