# The offline demo: a small pico-decoder on the embedded corpus (the Python standard library's own
# source, one byte per token), built on first use. 3.5 to 4 minutes (204 to 238 s) on the README's 2-core AMD EPYC.
#   python train.py configs/local.py
import torch

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
training.optimization.lr = 2.5e-3
training.optimization.lr_warmup_steps = 20
training.optimization.max_grad_norm = 1.0
# bf16 autocast, as on a GPU, where the CPU computes in bf16 itself (AVX512-BF16 or AMX): a quarter
# faster than float32 on the README's 2-core AMD EPYC. Elsewhere "auto": float32 on a CPU, where
# bf16 would be emulated, and bf16 on a GPU. (oneDNN's own bf16 check passes on any AVX-512 CPU.)
native_bf16 = any(getattr(torch.cpu, check, lambda: False)() for check in
                  ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
training.precision = "bf16-mixed" if native_bf16 else "auto"

checkpointing.run_name = "local"
checkpointing.save_every_n_steps = 100
checkpointing.log_spaced_until = 8  # Pythia-style early checkpoints: 0, 1, 2, 4, 8, then every 100
# Learning-dynamics captures on 64 of the held-out rows (all 512 took about 9 s a checkpoint on the
# README's 2-core AMD EPYC, a dozen training steps; the suite's configs capture on all, as pico-train)
checkpointing.learning_dynamics.eval_data = "builtin:stdlib-bytes"
checkpointing.learning_dynamics.eval_rows = 64
# At every checkpoint, on 128 of the corpus's held-out rows: perplexity (and bits per byte), the loss
# at each position and the in-context learning score; the training probe on 64 rows spread over the
# run, with Pythia's memorization test; induction heads on repeated random bytes, and each head's
# attention entropy. A syntax task: 400 held-out lines of Python, each against itself with a
# bracket mismatched or two words swapped; its accuracy rises from chance (0.5) as the model
# learns Python.
evaluation.metrics = ["paloma", "probe", "induction", "attention", "tasks"]
evaluation.paloma.dataset_name = "builtin:stdlib-bytes"
evaluation.paloma.rows = 128
evaluation.paloma.batch_size = 32
evaluation.probe.rows = 64
evaluation.probe.batch_size = 64
evaluation.tasks.names = ["builtin:python-syntax"]
evaluation.tasks.batch_size = 64
monitoring.logging.log_every_n_steps = 10
