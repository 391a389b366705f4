"""bench/bench_epoch.py runs on the CPU with tiny sizes: all three variants, their ratios, both sources."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

TINY = ["--device", "cpu", "--quick", "--model", "vit_tiny_patch16", "--depth", "2", "--img_size", "32", "--batch_size", "4",
        "--num_workers", "0", "--num_images", "12", "--image_size", "48", "--rank", "2", "--amp", "none"]


@pytest.mark.parametrize("source,variants", [("png", "exact,png,paper"), ("dicom-jpeg", "exact,paper")])
def test_bench_epoch_tiny(tmp_path, source, variants, capsys):
    import bench_epoch

    result = bench_epoch.main(TINY + ["--source", source, "--variants", variants, "--json", str(tmp_path / "r.json")])
    names = variants.split(",")
    assert list(result["epochs"]) == names
    for name in names:
        res = result["epochs"][name]
        assert res["images"] == 8 and len(res["epochs"]) == 1 and res["epochs_per_s"] > 0
        assert res["epochs"][0]["total_s"] >= res["epochs"][0]["wait_s"] >= 0
        assert not res["compiled"]  # --compile auto compiles on CUDA only
    assert result["epochs"]["paper"]["precision"] == "fp32"  # the paper's loop autocasts on CUDA only
    assert set(result["ratios"]) == {f"{n}/paper epochs/s" for n in names if n != "paper"}
    assert result["cache_build_s"] is not None and result["config"]["source"] == source
    assert json.loads((tmp_path / "r.json").read_text())["config"]["num_images"] == 12
    out = capsys.readouterr().out
    assert "| exact (" in out and "| paper (fp32) |" in out


def test_bench_epoch_rejects_unknown_variants():
    import bench_epoch

    with pytest.raises(SystemExit):
        bench_epoch.main(TINY + ["--variants", "exact,fast"])


FAKE_TIMEOUT = """#!/usr/bin/env bash
# Records "seconds command..." instead of running the benchmark.
echo "$*" >> "$CALLS"
"""


def _gpu_check_calls(tmp_path, **env):
    """The (timeout, command) pairs bench/gpu_check.sh would run on a GPU machine."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("timeout", FAKE_TIMEOUT), ("python3", "#!/bin/sh\ncat > /dev/null\n")):
        fake = bin_dir / name  # python3 only prints the environment report here
        fake.write_text(text)
        fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
               "OUT": str(tmp_path / "out"), "DEVICE": "cuda", **env}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(int(line.split()[0]), line.split()[1:]) for line in calls.read_text().splitlines()]


def test_gpu_check_fits_its_budget_and_names_real_benches(tmp_path):
    """On a GPU machine the steps' timeouts add up to at most 540 s (under 9 minutes), every
    step runs an existing bench script, and every bench_model contender it names exists."""
    import bench_model

    calls = _gpu_check_calls(tmp_path)
    assert sum(seconds for seconds, _ in calls) <= 540
    scripts = [cmd[1] for _, cmd in calls]
    assert all(cmd[0] == "python3" for _, cmd in calls)
    assert all((ROOT / script).is_file() for script in scripts)
    for expected in ("bench/bench_model.py", "bench/bench_lora_layer.py", "bench/profile_step.py",
                     "bench/bench_data.py", "bench/bench_epoch.py"):
        assert expected in scripts
    names = set(bench_model.TRAIN_IMPLS + bench_model.OPTIONAL_IMPLS)
    named = set()
    for _, cmd in calls:
        if cmd[1] == "bench/bench_model.py":
            named |= set(cmd[cmd.index("--impls") + 1].split(","))
    assert named <= names and {"ours_fp8", "peft_compile", "ours_compile", "ours_cudagraphs"} <= named
    # Every registered method and HF PEFT's DoRA and IA3 at the same targets, at a GPU batch.
    methods_steps = [cmd for _, cmd in calls if "--methods" in cmd]
    assert len(methods_steps) == 1
    step = methods_steps[0]
    assert step[step.index("--methods") + 1] == "all" and int(step[step.index("--batch_size") + 1]) >= 64
    assert set(bench_model.expand_methods("all")) >= {"dora_qkv", "peft_dora", "ia3_qkv", "peft_ia3",
                                                      "ours", "peft"}
    # The eager batch-128 step is asked for apart: over the budget with it.
    b128 = _gpu_check_calls(tmp_path, B128="1")
    assert len(b128) == len(calls) + 1 and sum(seconds for seconds, _ in b128) > 540
    assert any(cmd[cmd.index("--batch_size") + 1] == "128"
               and "ours_fp8" in cmd[cmd.index("--impls") + 1].split(",")
               for _, cmd in b128 if "--impls" in cmd)
    # The optional DICOM epoch and data rates add their own timeouts; the compiled contenders
    # can be left out.
    with_extras = _gpu_check_calls(tmp_path, DICOM="1", DATA="1")
    assert len(with_extras) == len(calls) + 2
    assert {"bench/bench_data.py", "bench/bench_epoch.py"} <= {cmd[1] for _, cmd in with_extras[len(calls) - 3:]}
    fp8_compiled = _gpu_check_calls(tmp_path, FP8_COMPILE="1")
    assert any("ours_fp8_compile" in " ".join(cmd) for _, cmd in fp8_compiled)
    no_compiled = _gpu_check_calls(tmp_path, COMPILED="0")
    assert not any("peft_compile" in " ".join(cmd) for _, cmd in no_compiled)
