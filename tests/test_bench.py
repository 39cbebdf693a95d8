"""bench.py --train: the trainer's own step, timed and profiled by kind of work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("bench")

ROOT = Path(__file__).resolve().parent.parent


def table_rows(output: str, header_start: str) -> list[list[str]]:
    """The cells of the body rows of the markdown table whose header starts with header_start."""
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start)) + 2
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def train_mode():
    """bench.py --train in one run: tiny at 32 tokens, two attention backends by two micro-batches
    by two DDP graphs: of the 8 variants, the math backend's in micro-batches of 4 run (under
    either graph) and the others say why they cannot."""
    # One thread: on a busy machine a team of threads spends its time waiting for its last member.
    result = subprocess.run([sys.executable, "bench.py", "--train", "--model", "tiny", "--seq-len", "32",
                             "--val-rows", "16",  # one row per GPU's share: the checkpoint's work, shortly
                             "--attention", "math", "cudnn", "--micro-batch", "4", "3",
                             "--ddp-graph", "per-bucket", "one", "--rounds", "3", "--warmup", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_mode_times_the_trainers_step_and_splits_it_by_kind_of_work(train_mode):
    assert "Machine: " in train_mode
    timing = table_rows(train_mode, "| model | step |")[0]
    assert timing[:2] == ["tiny (math)", "2 x 4 x 32"]  # the config file's 4 micro-steps of 2 rows, in 2 of 4
    assert float(timing[3].replace(",", "")) > 0  # tokens/s
    assert timing[4] == "n/a"  # no MFU without a GPU's peak
    assert timing[5].endswith("GB RSS")
    assert float(timing[7].rstrip("%")) > 0  # captures + evaluation / 1,000 steps
    shares = table_rows(train_mode, "| model | communication |")[0]
    assert shares[0] == "tiny (math)" and len(shares) == len(bench.KERNEL_CLASSES) + 3
    percents = [float(cell.rstrip("%")) for cell in shares[1:]]
    assert percents[list(bench.KERNEL_CLASSES).index("matmul")] > 0
    assert sum(percents) == pytest.approx(100, abs=3)  # one thread's ops and the gaps between them


def test_train_mode_times_each_attention_backend_and_names_one_that_cannot_run(train_mode):
    rows = {}
    for row in table_rows(train_mode, "| model | step |"):
        rows.setdefault(row[0], row)  # each backend's first variant
    assert float(rows["tiny (math)"][3].replace(",", "")) > 0
    assert rows["tiny (cudnn)"][1].startswith("not run: ")  # no cuDNN on a CPU: the row says so, the others run


def test_train_mode_times_each_micro_batch_and_ddp_graph_in_one_run_with_the_same_rows_per_step(train_mode):
    labels = ["tiny (math)", "tiny (math, one graph)"]
    rows = [row for row in table_rows(train_mode, "| model | step |") if row[0] in labels]
    # The same 8 rows per step (the config's 4 micro-steps of 2 on a CPU) in 2 micro-steps of 4.
    assert [row[:2] for row in rows[:2]] == [[label, "2 x 4 x 32"] for label in labels]
    assert all(float(row[3].replace(",", "")) > 0 for row in rows[:2])
    assert rows[2][:2] == ["tiny (math)", "not run: 8 rows per step are no whole number of micro-batches of 3"]
    assert rows[3][0] == "tiny (math, one graph)" and rows[3][1].startswith("not run: ")


def test_only_train_mode_takes_several_micro_batches():
    result = subprocess.run([sys.executable, "bench.py", "--memory", "--micro-batch", "4", "8"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "--micro-batch 4 8: expected one" in result.stderr


def test_a_variant_that_cannot_run_is_named_by_its_innermost_cause():
    try:
        try:
            raise RuntimeError("No viable backend for scaled_dot_product_attention was found.\nmore")
        except RuntimeError as e:
            raise ValueError("dynamo: unsupported") from e
    except ValueError:
        try:
            raise RuntimeError("RuntimeError when making fake tensor call")  # as torch._dynamo re-raises
        except RuntimeError as compiled:
            assert bench.why_not_run(compiled).startswith("No viable backend for scaled_dot_product")
    assert bench.why_not_run(RuntimeError("")) == "RuntimeError"


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
    ("flash_fwd_kernel", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0",
     "attention"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_1", "elementwise"),
    ("triton_poi_fused__scaled_dot_product_flash_attention_backward_2", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise"),
    ("triton_red_fused__log_softmax_nll_loss_forward_3", "cross-entropy"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>", "cross-entropy"),
    ("multi_tensor_apply_kernel", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("Memcpy HtoD (Pinned -> Device)", "other"),
    # CPU ops, by aten name
    ("aten::mm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_log_softmax_backward_data", "cross-entropy"),
    ("Optimizer.step#AdamW.step", "optimizer"),
    ("gloo:all_reduce", "communication"),
    ("aten::mul", "elementwise"),
    ("autograd::engine::evaluate_function: MmBackward0", "other"),
])
def test_kernels_are_classed_by_name(name, kind):
    assert bench.kernel_class(name) == kind


def test_a_cpu_op_takes_the_class_of_its_outermost_caller_that_has_one():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)  # a loop of elementwise ops
    model(torch.ones(2, 4)).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        optimizer.step()
        model(torch.ones(2, 4))
    classes = {(event.name, bench.op_class(event)) for event in profiler.events()}
    assert ("aten::lerp_", "optimizer") in classes  # under Optimizer.step
    assert ("aten::t", "matmul") in classes  # the weight's transpose, under aten::linear


def test_tokenize_mode_compares_the_command_with_tokenizers_own_batch_encoding():
    result = subprocess.run([sys.executable, "bench.py", "--tokenize", "--text-mb", "0.1", "--rounds", "1",
                             "--memory-mb", "0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    reference, pico = table_rows(result.stdout, "| run | tokens/s |")
    assert reference[0].startswith("tokenizers' encode_batch") and reference[2] == "1"
    assert pico[0].startswith("data.py tokenize") and float(pico[2]) > 0
