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
