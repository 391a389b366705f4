"""The entry script's steps after flag resolution: derived values never written back into args."""
from pathlib import Path
from types import SimpleNamespace

import main_finetune_lora as mfl


def resolved(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    weights = tmp_path / "MRM.pth"
    weights.write_bytes(b"x")
    data = tmp_path / "NIH_ChestX-ray"
    data.mkdir()
    argv = ["--finetune", str(weights), "--data_path", str(data), "--blr", "0.004", *extra]
    parser = mfl.get_args_parser()
    args = parser.parse_args(argv)
    args.explicit = mfl.explicit_flags(parser, argv)
    return mfl.resolve_args(args, args.explicit)


def test_data_defaults_fill_a_copy(tmp_path):
    args = resolved(tmp_path)
    before = dict(vars(args))
    filled = mfl.with_data_defaults(args, eff_batch=128)
    assert vars(args) == before and args.lr is None and args.dataset is None
    assert (filled.dataset, filled.lr) == ("nih", 0.004 * 128 / 256)
    assert mfl.with_data_defaults(resolved(tmp_path / "b", "--lr", "0.2"), 128).lr == 0.2


def test_recorded_args_keep_their_keys(tmp_path):
    """config.json's "args" holds every flag plus what the run resolved, under the old names."""
    args = mfl.with_data_defaults(resolved(tmp_path, "--resume", "auto"), eff_batch=64)
    plan = mfl.RunPlan(out=tmp_path / "run", eff_batch=64, committed=None, resume="",
                       overwrite=True, log_dir=tmp_path / "run" / "logs")
    data = SimpleNamespace(cache_used={"train": None}, dicom_scaling_used="minmax",
                           split_sha256={"train": "ab"})
    recorded = mfl.run_args(args, plan, data)
    assert set(recorded) == (set(vars(args)) - {"explicit", "notes"}) | {
        "cache_used", "dicom_scaling_used", "split_sha256"}
    assert (recorded["resume"], recorded["overwrite"]) == ("", True)
    assert (recorded["cache_used"], recorded["dicom_scaling_used"]) == ({"train": None}, "minmax")
    assert args.resume == "auto" and not hasattr(args, "cache_used")
    assert isinstance(plan.log_dir, Path)
