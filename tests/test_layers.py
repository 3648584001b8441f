"""The layers stay apart (DESIGN.md): gptjax/ imports nothing above it, a stage runner never
imports another stage, a tool never imports a stage, aot and bench import only gptjax and
configs. Checked on the source's import statements, so a violation fails here before it
can make an import cycle or a hidden coupling."""

import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES_DIR = os.path.join(ROOT, "experiments", "stages")
STAGES = sorted(f[:-3] for f in os.listdir(STAGES_DIR) if f.endswith(".py") and f != "__init__.py")
TOOLS = (
    "aot",
    "aot_programs",
    "aot_table",
    "bench",
    "bench_gpu",
    "bench_profile",
    "bench_rl",
    "bench_torch",
    "calibrate",
    "chat",
    "plots",
    "report",
    "show_data",
    "sweep",
)


def imported_modules(path: str) -> set[str]:
    """Every module an `import` or `from ... import` names, with `from a import b` also
    counted as a.b (b may be a submodule)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def stage_imports(path: str) -> set[str]:
    return {m for m in imported_modules(path) if m.startswith("experiments.stages.")}


def test_the_layers_are_found():
    # A test that finds no stage or tool would pass vacuously.
    assert {"pretrain", "sft", "compare", "rm", "rl", "dpo", "evaluate"} <= set(STAGES)
    for tool in TOOLS:
        assert os.path.exists(os.path.join(ROOT, "experiments", f"{tool}.py")), tool


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_never_imports_another_stage(stage):
    path = os.path.join(STAGES_DIR, f"{stage}.py")
    assert stage_imports(path) <= {f"experiments.stages.{stage}"}, stage_imports(path)


@pytest.mark.parametrize("tool", TOOLS)
def test_a_tool_never_imports_a_stage(tool):
    assert not stage_imports(os.path.join(ROOT, "experiments", f"{tool}.py"))


@pytest.mark.parametrize(
    "tool",
    ["aot", "aot_programs", "aot_table", "bench", "bench_gpu", "bench_profile", "bench_rl",
     "bench_torch"],
)  # fmt: skip
def test_aot_and_bench_import_only_gptjax_and_configs(tool):
    ours = {
        m
        for m in imported_modules(os.path.join(ROOT, "experiments", f"{tool}.py"))
        if m.split(".")[0] in ("experiments", "configs", "gptjax")
    }
    # aot_table reads aot's own results, bench_rl is bench's (tools of the same command);
    # experiments.cli is the command-line entry (absl only).
    allowed = ("gptjax", "configs", "experiments.aot", "experiments.bench", "experiments.cli")
    assert all(m.startswith(allowed) for m in ours), sorted(ours)


def test_the_library_imports_nothing_above_it():
    for root, _, names in os.walk(os.path.join(ROOT, "gptjax")):
        for name in names:
            if name.endswith(".py"):
                above = {
                    m
                    for m in imported_modules(os.path.join(root, name))
                    if m.split(".")[0] in ("experiments", "configs", "tests")
                }
                assert not above, (name, above)


def test_the_gpu_benchmark_reads_each_gpus_bf16_peak():
    """MFU on a GPU divides by NVIDIA's dense bf16 figure for the device kind JAX reports."""
    import types

    from experiments import bench_gpu

    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    h200 = types.SimpleNamespace(device_kind="NVIDIA H200", platform="gpu")
    assert bench_gpu.device_peak(h100)[0] == bench_gpu.device_peak(h200)[0] == 989.4e12
    assert bench_gpu.parse_train("tiny:4x32,llama_1b") == [
        ("tiny", 4, 32, {}),
        ("llama_1b", 8, 2048, {"remat": "dots"}),
    ]


def test_the_gpu_benchmark_runs_on_a_cpu_at_tiny_shapes(tmp_path, monkeypatch):
    """`bench gpu` as a lent GPU machine runs it (experiments/gpu_run.sh), every path but
    cuDNN's kernel: the attention check, training MFU, decode at B = 1, 64, 256 and a PPO
    iteration's split, at tiny shapes with the XLA attention path."""
    import json

    from experiments import bench, bench_gpu, bench_rl

    # The CPU's measured bf16 peak (a 4096^3 matmul) is the one slow part, and not GPU code.
    monkeypatch.setattr(bench_gpu, "device_peak", lambda device=None: (1e12, "test"))
    # One epoch of 16 prompts instead of tiny's 4 epochs of 64: the same code, a sixteenth
    # of the update's work (2.7 s an iteration at the suite's -O0).
    small_ppo = functools.partial(
        bench_rl.bench_rl, fields=dict(epochs=1, prompts_per_iteration=16)
    )
    monkeypatch.setattr(bench_rl, "bench_rl", small_ppo)
    out = tmp_path / "gpu.json"
    argv = ["gpu", "--train=tiny:8x32", "--steps=2", "--attention=xla", "--decode=tiny"]
    argv += ["--prompt_len=4", "--new_tokens=4", "--ppo=tiny", "--iterations=1", f"--out={out}"]
    assert bench.main(argv) == 0
    got = json.loads(out.read_text())
    check = got["attention_check"]
    assert check["ok"] and check["logits_rel_diff"] < 1e-5 and check["grads_rel_diff"] < 1e-5
    assert [(r["config"], r["batch"], r["seq_len"]) for r in got["train"]] == [("tiny", 8, 32)]
    assert 0 < got["train"][0]["mfu"] < 1
    assert [r["batch"] for r in got["decode"]] == [1, 64, 256]
    assert all(r["tokens_per_s"] > 0 for r in got["decode"])
    (ppo,) = got["ppo"]
    assert min(ppo["rollout_s"], ppo["score_s"], ppo["update_s"]) > 0


def test_the_benchmarks_run_every_preset_on_one_device():
    """`bench gpu` times llama_1b on one GPU: the benchmarks' mesh is one device whatever
    the preset's own (llama_1b's is tensor 4 over a pod's hosts)."""
    from configs import model as model_presets
    from configs import pipeline
    from experiments.bench_rl import bench_mesh

    for name in model_presets.MODELS:
        mesh = bench_mesh(pipeline.get_config(name))
        assert mesh.devices.size == 1, name


def test_the_gpu_attention_check_fails_an_attention_without_its_causal_mask(monkeypatch):
    """The check compares with gptjax's own attention on peaked attention rows: a kernel
    that drops the causal mask, or scales the logits 10% wrong, fails it."""
    import jax

    from experiments import bench_gpu
    from gptjax import layers, model

    own = layers.attention

    def no_mask(impl, q, k, v, mask):
        if impl == "einsum":
            return own(impl, q, k, v, mask)
        return jax.nn.dot_product_attention(q, k, v, implementation="xla").astype(v.dtype)

    def misscaled(impl, q, k, v, mask):
        return own("einsum", q * 1.1 if impl == "xla" else q, k, v, mask)

    assert bench_gpu.attention_check("tiny", "xla")["ok"]
    for broken in (no_mask, misscaled):
        monkeypatch.setattr(model, "attention", broken)
        assert not bench_gpu.attention_check("tiny", "xla")["ok"], broken.__name__


def test_the_profile_counts_each_ops_own_time_once():
    """A while loop's events contain its body's ops: each op's self time excludes what is
    nested in it, so the self times add up to the outermost events' durations."""
    from experiments.bench_profile import self_times

    events = [
        (0, 100, "while"),  # [0, 100) holds two body ops and a nested loop
        (10, 20, "dot"),
        (40, 50, "inner_while"),  # [40, 90) holds one op
        (50, 30, "copy"),
        (120, 5, "dot"),  # after the loop
    ]
    got = self_times(events[::-1])  # order of arrival does not matter
    assert got == {"while": 30, "dot": 25, "inner_while": 20, "copy": 30}
    assert sum(got.values()) == 105
