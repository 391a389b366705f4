"""predict.py: inputs, equality with direct evaluation, broken files, thresholds, exit codes."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import predict
from _fakes import mrm_checkpoint, trained_checkpoint
from datasets import CLASS_NAMES, build_dataset, build_transform, make_demo_dataset
from checkpoints import load_trained

NIH = CLASS_NAMES["nih"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_images(folder: Path) -> dict[str, Path]:
    """Good images of several kinds (8-bit, 16-bit, RGB JPEG, non-square) and broken ones."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    files = {}
    files["grey8"] = folder / "grey8.png"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(files["grey8"])
    files["grey16"] = folder / "sub" / "grey16.png"
    Image.fromarray(rng.integers(0, 65535, (70, 70)).astype(np.uint16)).save(files["grey16"])
    files["rgb"] = folder / "sub" / "colour.jpg"
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), "RGB").save(files["rgb"])
    files["truncated"] = folder / "truncated.png"
    files["truncated"].write_bytes(files["grey8"].read_bytes()[:200])
    files["text"] = folder / "notes.png"
    files["text"].write_text("not an image")
    (folder / "readme.md").write_text("ignored by the folder search")
    return files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    stem, mrm = trained_checkpoint(root)
    data = make_demo_dataset(root / "demo", num_images=24, image_size=64, seed=1)
    return {"root": root, "stem": stem, "mrm": mrm, "data": data}


def direct_probs(model, config, data):
    """Probabilities of the model evaluated directly on the test split (the `--eval` path)."""
    ds = build_dataset("test", data, dataset="nih", cache="off",
                       transform=build_transform(is_train=False, recipe=config.eval_recipe,
                                                 input_size=config.img_size, norm=config.norm))
    out = []
    with torch.no_grad():
        for x, _ in DataLoader(ds, batch_size=3):
            out.append(torch.sigmoid(model(x)))
    return ds, torch.cat(out).numpy()


def test_predict_images_equal_direct_evaluation(setup):
    model, config = load_trained(setup["stem"])
    ds, ref = direct_probs(model, config, setup["data"])
    probs, failures = predict.predict_images(model, config, ds.files, batch_size=2, amp="none")
    assert not failures
    assert probs.shape == (len(ds), len(NIH))
    np.testing.assert_allclose(probs, ref, atol=1e-6, rtol=0)
    # bf16 autocast (the CPU default of --amp auto) stays close to fp32.
    probs_bf16, _ = predict.predict_images(model, config, ds.files, batch_size=4, amp="bf16")
    np.testing.assert_allclose(probs_bf16, ref, atol=0.05, rtol=0)


def test_cli_split_file_rows_join_with_eval_paths(setup, tmp_path, capsys):
    model, config = load_trained(setup["stem"])
    ds, ref = direct_probs(model, config, setup["data"])
    out = tmp_path / "preds.csv"
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--inputs",
                       str(setup["data"] / "test_list.txt"), "--output", str(out),
                       "--amp", "none", "--device", "cpu", "--num_workers", "0"])
    assert rc == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["path", *NIH]
    assert [r["path"] for r in rows] == ds.paths  # relative paths as in the split file
    got = np.array([[float(r[c]) for c in NIH] for r in rows])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert "predicted %d images, 0 failed" % len(ds) in capsys.readouterr().out
    assert not predict.failures_path(out).exists()


def test_eval_with_skipped_images_says_so_in_its_results(setup, tmp_path):
    """`--eval --skip_bad` scores fewer images than the split lists: the results and the
    AUROC table name the split's size and the images left out, so the score cannot pass for
    one on the whole split."""
    import json
    import logging
    import shutil

    trainer = pytest.importorskip("main_finetune_lora")
    data = tmp_path / "demo"
    shutil.copytree(setup["data"], data)
    lines = (data / "test_list.txt").read_text().splitlines()
    bad_name = lines[2].split()[0]
    (next(data.rglob(bad_name))).write_bytes(b"not a png")
    out = tmp_path / "eval"
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        rc = trainer.cli(["--eval", "--resume", str(setup["stem"]), "--finetune", str(setup["mrm"]),
                          "--data_path", str(data), "--dataset", "nih", "--cache", "off",
                          "--skip_bad", "--device", "cpu", "--amp", "none", "--num_workers", "0",
                          "--output_dir", str(out), "--no_progress"])
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    assert rc == 0
    (written,) = out.rglob("results_test.json")
    results = json.loads(written.read_text())
    assert results["split_images"] == len(lines) and results["num_images"] == len(lines) - 1
    assert [(s["line"], s["path"]) for s in results["skipped"]] == [(3, bad_name)]
    table = written.with_name("results_test_auroc.md").read_text()
    assert f"Scored on {len(lines) - 1} of the {len(lines)} images" in table and bad_name in table


def test_predictions_equal_eval_predictions_csv(setup, tmp_path):
    """`main_finetune_lora.py --eval` and predict.py on the same test split agree per image."""
    import logging

    trainer = pytest.importorskip("main_finetune_lora")
    out = tmp_path / "eval"
    handlers, level = logging.root.handlers[:], logging.root.level
    try:  # in-process (a subprocess would spend most of its time importing torch and timm)
        rc = trainer.cli(["--eval", "--resume", str(setup["stem"]), "--finetune", str(setup["mrm"]),
                          "--data_path", str(setup["data"]), "--dataset", "nih", "--cache", "off",
                          "--device", "cpu", "--amp", "none", "--num_workers", "0",
                          "--output_dir", str(out), "--no_progress"])
    finally:  # the trainer configures the root logger for its own process
        logging.root.handlers[:], logging.root.level = handlers, level
    assert rc == 0
    # An evaluation writes into a folder of its own under --output_dir (named after the split).
    (written,) = out.rglob("predictions_test.csv")
    evaluated = {r["path"]: r for r in read_csv(written)}
    pred_csv = tmp_path / "preds.csv"
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--inputs",
                       str(setup["data"] / "test_list.txt"), "--output", str(pred_csv),
                       "--amp", "none", "--num_workers", "0"])
    assert rc == 0
    predicted = read_csv(pred_csv)
    assert [r["path"] for r in predicted] == list(evaluated)
    for row in predicted:
        ref = evaluated[row["path"]]
        assert f"label_{NIH[0]}" in ref
        np.testing.assert_allclose([float(row[c]) for c in NIH], [float(ref[c]) for c in NIH],
                                   atol=1e-6, rtol=0)
    # The evaluation's reports come from util.reports.
    with Image.open(written.with_name("roc_test.png")) as img:
        assert img.size == (800, 800)
    assert written.with_name("results_test_auroc.md").is_file()
    assert written.with_name("results_test_auroc.csv").is_file()


def test_mixed_good_and_broken_inputs(setup, tmp_path, capsys):
    files = save_images(tmp_path / "images")
    missing = tmp_path / "nowhere.png"
    out = tmp_path / "out" / "preds.csv"
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--finetune", str(setup["mrm"]),
                       "--inputs", str(tmp_path / "images"), str(missing), "--output", str(out),
                       "--batch_size", "2", "--num_workers", "2", "--device", "cpu"])
    assert rc == predict.EXIT_SOME_FAILED  # the readable ones are written: not a failure (1)
    rows = read_csv(out)
    names = {r["path"] for r in rows}
    assert names == {str(files[k]) for k in ("grey8", "grey16", "rgb")}
    for r in rows:
        p = np.array([float(r[c]) for c in NIH])
        assert np.all((p >= 0) & (p <= 1))
    failed = {r["path"]: r["reason"] for r in read_csv(predict.failures_path(out))}
    assert set(failed) == {str(files["truncated"]), str(files["text"]), str(missing)}
    assert "not found" in failed[str(missing)]
    assert "predicted 3 images, 3 failed" in capsys.readouterr().out


def test_no_paths_gives_empty_result(setup):
    model, config = load_trained(setup["stem"])
    probs, failures = predict.predict_images(model, config, [], amp="none")
    assert probs.shape == (0, len(NIH)) and not failures


def test_threshold_columns_and_json(setup, tmp_path):
    files = save_images(tmp_path / "images")
    out = tmp_path / "t.csv"
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--inputs", str(files["grey8"]),
                       str(files["rgb"]), "--output", str(out), "--threshold", "0.5",
                       "--num_workers", "0", "--amp", "none"])
    assert rc == 0
    rows = read_csv(out)
    assert list(rows[0])[-len(NIH):] == [f"pred_{c}" for c in NIH]
    for r in rows:
        for c in NIH:
            assert r[f"pred_{c}"] == str(int(float(r[c]) >= 0.5))
    table = tmp_path / "thresholds.json"
    table.write_text(json.dumps({c: 0.01 if c == "Mass" else 0.99 for c in NIH}))
    run_folder = setup["stem"].parent  # a run folder stands for its checkpoint-best
    rc = predict.main(["--checkpoint", str(run_folder), "--inputs", str(files["grey8"]),
                       "--output", str(out), "--threshold", str(table), "--num_workers", "0",
                       "--overwrite"])
    assert rc == 0
    row = read_csv(out)[0]
    assert row["pred_Mass"] == str(int(float(row["Mass"]) >= 0.01))
    assert row["pred_Edema"] == str(int(float(row["Edema"]) >= 0.99))


@pytest.mark.parametrize("extra,message", [
    (["--checkpoint", "nowhere/checkpoint-best"], "--checkpoint"),
    (["--heatmap_class", "Fracture"], "--heatmap_class"),
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "maybe"], "--threshold"),
])
def test_usage_errors_exit_2(setup, tmp_path, capsys, extra, message):
    img = tmp_path / "a.png"
    Image.new("L", (32, 32), 100).save(img)
    argv = ["--checkpoint", str(setup["stem"]), "--inputs", str(img),
            "--output", str(tmp_path / "p.csv"), "--num_workers", "0"]
    rc = predict.main(argv + extra)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("predict.py: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_wrong_pretrained_file_and_empty_inputs_exit_2(setup, tmp_path, caplog, capsys):
    other = tmp_path / "other.pth"
    mrm_checkpoint(other, seed=5)
    img = tmp_path / "a.png"
    Image.new("L", (32, 32), 100).save(img)
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--finetune", str(other),
                       "--inputs", str(img), "--output", str(tmp_path / "p.csv")])
    assert rc == 2 and "not the pre-trained file" in capsys.readouterr().err
    # A config without the recorded hash (older or hand-written) cannot be checked: said so.
    import json
    import shutil

    stem = tmp_path / "nohash" / "checkpoint-best"
    stem.parent.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(str(setup["stem"]) + suffix, str(stem) + suffix)
    config = json.loads(stem.with_suffix(".json").read_text())
    config["pretrained_sha256"] = None
    stem.with_suffix(".json").write_text(json.dumps(config))
    caplog.clear()
    rc = predict.main(["--checkpoint", str(stem), "--finetune", str(other),
                       "--inputs", str(img), "--output", str(tmp_path / "p2.csv")])
    assert rc == 0 and "records no SHA-256 of the pre-trained file" in caplog.text
    (tmp_path / "empty").mkdir()
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--inputs", str(tmp_path / "empty"),
                       "--output", str(tmp_path / "p.csv")])
    assert rc == 2 and "no images found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(setup["stem"])])  # --inputs missing
    assert exc.value.code == 2


def test_collect_inputs_path_rules(tmp_path):
    (tmp_path / "nih" / "all_classes").mkdir(parents=True)
    (tmp_path / "nih" / "all_classes" / "a.png").touch()
    split = tmp_path / "nih" / "test_list.txt"
    split.write_text("a.png 0 1\n\nb.png 1 0\n")
    images, failures = predict.collect_inputs([split], dataset="nih")
    assert [i.name for i in images] == ["a.png", "b.png"]
    assert images[0].file == tmp_path / "nih" / "all_classes" / "a.png"
    assert not failures  # b.png is missing: found out when decoding, as for any file
    # A label-free list with another data folder and the plain path rule (RSNA's trailing space).
    lst = tmp_path / "list.txt"
    lst.write_text("stage_2_train_images/x.dcm 1 \n")
    images, _ = predict.collect_inputs([lst], data_path=tmp_path / "nih", dataset="rsna")
    assert images[0].name == "stage_2_train_images/x.dcm"
    assert images[0].file == tmp_path / "nih" / "stage_2_train_images" / "x.dcm"
    with pytest.raises(predict.UsageError, match="--data_path"):
        predict.collect_inputs([lst], data_path=tmp_path / "absent")


def test_resolve_amp():
    cpu = torch.device("cpu")
    # bf16 only where the CPU computes it natively; emulated bf16 is slower than fp32.
    fast_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert predict.resolve_amp("auto", cpu) is (torch.bfloat16 if fast_bf16 else None)
    assert predict.resolve_amp("bf16", cpu) is torch.bfloat16
    assert predict.resolve_amp("none", cpu) is None
    assert predict.resolve_amp("fp16", cpu) is torch.float16
    with pytest.raises(predict.UsageError, match="--amp"):
        predict.resolve_amp("fp8", cpu)


def test_predict_refuses_to_write_over_a_runs_own_results(setup, tmp_path, capsys):
    """A run's predictions_test.csv (with labels, read by util.compare) is not replaced by an
    unlabelled prediction CSV: predict.py refuses an --output that a run recorded as its own."""
    from util.runfolder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    mine = run / "predictions_test.csv"
    mine.write_text("path,label_x\n")
    RunFolder(run).record(mine)
    args = ["--checkpoint", str(setup["stem"]), "--inputs", str(setup["data"] / "test_list.txt"),
            "--amp", "none", "--device", "cpu", "--num_workers", "0"]
    assert predict.main([*args, "--output", str(mine), "--overwrite"]) == 2  # even when asked
    assert "is a file of the training run in" in capsys.readouterr().err
    assert mine.read_text() == "path,label_x\n"
    other = run / "predictions_external.csv"  # not one of the run's files: allowed
    assert predict.main([*args, "--output", str(other)]) == 0 and other.is_file()


def test_heatmap_name_clash_is_refused_before_anything_is_written(setup, tmp_path, capsys):
    """Two split files (each beside its own images) that list one name: their heatmaps would
    write one file, so the run stops with a usage error before predicting or writing."""
    src = next(setup["data"].rglob("*.png"))
    lists = []
    for sub in ("a", "b"):
        folder = tmp_path / sub
        folder.mkdir()
        img = Image.open(src)
        (img if sub == "a" else img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).save(folder / "x.png")
        (folder / "list.txt").write_text("x.png\n")
        lists.append(str(folder / "list.txt"))
    out = tmp_path / "preds.csv"
    rc = predict.main(["--checkpoint", str(setup["stem"]), "--inputs", *lists, "--output", str(out),
                       "--heatmap_class", NIH[0], "--amp", "none", "--device", "cpu",
                       "--num_workers", "0", "--dataset", "custom"])
    err = capsys.readouterr().err
    assert rc == 2 and "--heatmap_class" in err and "one name" in err
    assert not out.exists()
