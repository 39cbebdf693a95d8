# The offline demo: a small pico-decoder on the embedded corpus (the Python standard library's
# own source, one byte per token), built on first use. A few minutes on 2 CPU cores.
#   python train.py configs/local.py
data.dataset.name = "builtin:stdlib-bytes"
data.tokenizer.name = "bytes"
data.tokenizer.vocab_size = 257
data.dataloader.batch_size = 32

model.vocab_size = 257  # 256 byte values and an end-of-document id
model.max_seq_len = 256
model.d_model = 128
model.n_layers = 4
model.attention_n_heads = 4
model.attention_n_kv_heads = 2
model.activation_hidden_dim = 512

training.max_steps = 400
training.optimization.lr = 2e-3
training.optimization.lr_warmup_steps = 20
training.optimization.max_grad_norm = 1.0

checkpointing.run_name = "local"
checkpointing.save_every_n_steps = 100
# Learning-dynamics captures on the same held-out rows; Pythia-style early checkpoints up to 8
checkpointing.learning_dynamics.eval_data = "builtin:stdlib-bytes"
checkpointing.log_spaced_until = 8
# Perplexity at every checkpoint on the corpus's held-out split (512 rows), in bits per byte too,
# with the loss at each position and the in-context learning score; induction heads on repeated
# random bytes, and each head's attention entropy on the held-out rows. A syntax task: 400 held-out
# lines of Python, each against itself with a bracket mismatched or two words swapped; its
# accuracy rises from chance (0.5) as the model learns Python.
evaluation.metrics = ["paloma", "induction", "attention", "tasks"]
evaluation.tasks.names = ["builtin:python-syntax"]
evaluation.paloma.dataset_name = "builtin:stdlib-bytes"
evaluation.paloma.batch_size = 32
monitoring.logging.log_every_n_steps = 10
