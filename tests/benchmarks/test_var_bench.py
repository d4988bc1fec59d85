"""benchmarks/var.py's own logic: it counts the passes each prior takes for one image."""

from tests.script_module import load_script

bench = load_script("benchmarks/var.py")


def test_passes_are_one_per_code_for_raster_and_one_per_scale_for_var():
    models = bench.priors(8, 16)
    counts = {name: bench.passes(model) for name, model in models.items()}
    assert counts == {"raster (default: seed blocks)": 64, "raster (GPT blocks)": 64,
                      "var (GPT blocks, block-causal)": 6}  # scales 1,2,3,4,6,8
