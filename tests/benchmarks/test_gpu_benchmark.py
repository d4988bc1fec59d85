"""benchmarks/gpu.py: its steps run (on the CPU at toy sizes) and it exits in one line without
CUDA. Its figures come from a GPU; here only the code paths are checked."""

import pytest
import torch

from tests.script_module import load_script


@pytest.fixture(scope="module")
def gpu():
    return load_script("benchmarks/gpu.py")


def test_without_cuda_it_says_so_in_one_line(gpu, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the script would measure it")
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_every_timed_step_runs_on_the_cpu(gpu):
    cpu = torch.device("cpu")
    for name in ("floor whole", "floor chunked", "vq", "ema", "default"):
        gpu.quantizer_step(name, 1024, 8, 32, cpu)()
    for precision in ("fp32", "bf16", "fp16"):
        gpu.stage1_step("seed", 16, 3, 2, precision, None, cpu)()
        gpu.prior_step(gpu.prior_config(2, 8, layers=1), 2, precision, cpu)()
    gpu.stage1_step("vqgan", 16, 3, 2, "bf16", None, cpu)()
    assert gpu.step_flops(gpu.stage1_step("default", 16, 1, 2, "fp32", None, cpu)) > 0


def test_tables_are_markdown(gpu):
    cpu = torch.device("cpu")
    lines = gpu.sampling_table(gpu.prior_config(2, 8, layers=1), [2], cpu)
    assert lines[1].startswith("| batch |") and len(lines) == 3 + 4
    assert all(line.count("|") == lines[1].count("|") for line in lines[1:])
    lines = gpu.prior_table(gpu.prior_config(2, 8, layers=1), 2, ["fp32", "tf32"], cpu, 1, 1)
    assert lines[-1].startswith("| tf32 |") and "1.00x" in lines[-1]
    lines = gpu.parallel_table(2, 8, [2], 3, cpu)
    assert lines[1].startswith("| batch |") and len(lines) == 3 + 5
    assert all(line.count("|") == lines[1].count("|") for line in lines[1:])
    assert "maskgit, bf16" in lines[-1] and "autoregressive eager, fp32" in lines[3]
