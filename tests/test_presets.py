"""Presets: every LoRA, full fine-tuning and linear-probe preset resolves to the documented numbers."""
import pytest

from conftest import SHARED
from util.presets import FULL_PRESETS, LINEAR_PRESETS, PRESETS, preset_help, resolve_preset

# The paper README's tables, copied verbatim from the project's facts sheet (rows as written there).
MRM_TABLE = """\
| NIH | 0.05 / 4 | 0.05 / 8 | 0.2 / 32 |
| CheXpert | 0.02 / 4 | 0.05 / 16 | 0.01 / 32 |
| RSNA | 0.01 / 4 | 0.01 / 32 | 0.01 / 32 |"""
MAE_TABLE = """\
| NIH | 400 / 3e-3 / 4 | 200 / 1e-3 / 8 | 100 / 3e-3 / 32 |
| CheXpert | 400 / 3e-3 / 4 | 100 / 5e-3 / 8 | 100 / 3e-3 / 32 |
| RSNA | 100 / 3e-3 / 4 | 100 / 5e-3 / 8 | 100 / 5e-3 / 32 |"""
# Recipes written out in the facts sheet's prose (README, ft_mrm.sh, ft_cxrmae.sh).
MRM_LORA = dict(optimizer="sgd", epochs=100, weight_decay=0.0, warmup_epochs=5, drop_path=0.1,
                batch_size=64, reprob=0.0, norm="mrm")
MAE_LORA = dict(optimizer="adamw", layer_decay=0.65, weight_decay=0.05, reprob=0.25,
                aa="rand-m9-mstd0.5-inc1", batch_size=64, norm="cxr_mae", lr=None)
MRM_FULL = dict(optimizer="sgd", lr=1e-2, epochs=200, warmup_epochs=5, weight_decay=0.0,
                drop_path=0.1, reprob=0.0, batch_size=64, norm="mrm")
MAE_FULL = dict(optimizer="adamw", blr=5e-4, lr=None, epochs=400, warmup_epochs=5, layer_decay=0.65,
                weight_decay=0.05, drop_path=0.1, reprob=0.25, batch_size=64, norm="cxr_mae")
DATASETS = {"NIH": "nih", "CheXpert": "chexpert", "RSNA": "rsna"}
SIZES = (1, 10, 100)


def parse_table(table: str) -> dict[tuple[str, int], list[str]]:
    """(dataset, percent) -> the cell's ' / '-separated values."""
    cells = {}
    for row in table.splitlines():
        name, *values = [c.strip() for c in row.strip("|").split("|")]
        for pct, cell in zip(SIZES, values):
            cells[(DATASETS[name], pct)] = cell.split(" / ")
    return cells


MRM_CELLS, MAE_CELLS = parse_table(MRM_TABLE), parse_table(MAE_TABLE)


def test_tables_are_the_facts_sheets():
    facts = SHARED / "FACTS.md"
    if not facts.is_file():
        pytest.skip("../shared/FACTS.md not present")
    text = facts.read_text()
    for row in (MRM_TABLE + "\n" + MAE_TABLE).splitlines():
        assert row in text, row


def test_eighteen_settings_per_method():
    expected = {f"{d}-{p}-{w}" for d in DATASETS.values() for p in SIZES for w in ("mrm", "cxr_mae")}
    assert set(PRESETS) == set(FULL_PRESETS) == set(LINEAR_PRESETS) == expected


@pytest.mark.parametrize("key", sorted(MRM_CELLS))
def test_lora_mrm(key):
    dataset, pct = key
    lr, rank = MRM_CELLS[key]
    values, source = resolve_preset(f"{dataset}-{pct}-mrm", "lora")
    assert values == dict(MRM_LORA, lr=float(lr), lora_rank=int(rank), dataset=dataset,
                          data_size=f"{pct}%", global_batch=64)
    assert source == "paper README table (LoRA, MRM weights)"


@pytest.mark.parametrize("key", sorted(MAE_CELLS))
def test_lora_cxr_mae(key):
    dataset, pct = key
    epochs, blr, rank = MAE_CELLS[key]
    values, source = resolve_preset(f"{dataset}-{pct}-cxr_mae", "lora")
    assert values == dict(MAE_LORA, epochs=int(epochs), blr=float(blr), lora_rank=int(rank),
                          dataset=dataset, data_size=f"{pct}%", global_batch=64,
                          warmup_epochs=5, drop_path=0.1)
    assert source == "paper README table (LoRA, CXR_MAE weights)"


@pytest.mark.parametrize("weights,recipe,script", [("mrm", MRM_FULL, "ft_mrm.sh"),
                                                   ("cxr_mae", MAE_FULL, "ft_cxrmae.sh")])
@pytest.mark.parametrize("key", sorted(MRM_CELLS))
def test_full_fine_tuning(key, weights, recipe, script):
    dataset, pct = key
    values, source = resolve_preset(f"{dataset}-{pct}-{weights}", "full")
    assert "lora_rank" not in values
    for name, value in recipe.items():
        if name != "epochs":
            assert values[name] == value, name
    assert (values["dataset"], values["data_size"], values["global_batch"]) == (dataset, f"{pct}%", 64)
    if key == ("nih", 1):  # the one published setting: the script exactly
        assert values["epochs"] == recipe["epochs"]
        assert source == f"paper {script} (NIH 1%)"
    else:  # documented rule: the script's recipe, the LoRA table's epochs
        lora_epochs = 100 if weights == "mrm" else int(MAE_CELLS[key][0])
        assert values["epochs"] == lora_epochs
        assert source.startswith("no published recipe:") and script in source
        assert f"({lora_epochs})" in source


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_linear_probe_is_the_lora_recipe_without_adapters(name):
    values, source = resolve_preset(name, "linear")
    lora_values, _ = resolve_preset(name, "lora")
    assert "lora_rank" not in values and values == {k: v for k, v in lora_values.items() if k != "lora_rank"}
    assert source.startswith("no published recipe:") and name in source


def test_resolved_values_are_copies():
    values, _ = resolve_preset("nih-1-mrm", "full")
    values["lr"] = 123.0
    assert resolve_preset("nih-1-mrm", "full")[0]["lr"] == 1e-2


def test_bad_names():
    with pytest.raises(ValueError, match="preset 'nih-5-mrm'"):
        resolve_preset("nih-5-mrm", "full")


def test_a_method_without_a_recipe_keeps_the_data_and_schedule_and_takes_its_own_lr():
    lora_values, _ = resolve_preset("chexpert-10-mrm", "lora")
    values, source = resolve_preset("chexpert-10-mrm", "ssf", method_lr=(5e-3, "SSF paper", "sgd"))
    assert values["lr"] == 5e-3 and "lora_rank" not in values
    assert {k: v for k, v in values.items() if k != "lr"} == \
        {k: v for k, v in lora_values.items() if k not in ("lr", "lora_rank")}
    assert "lr 0.005 (SSF paper)" in source
    same, _ = resolve_preset("chexpert-10-mrm", "ssf")
    assert same["lr"] == lora_values["lr"]
    other, source = resolve_preset("chexpert-10-mrm", "ssf", method_lr=(5e-3, "SSF paper", "adamw"))
    assert other["lr"] == lora_values["lr"] and "is for adamw" in source
    assert "full" in preset_help() and "preset_source" in preset_help()


@pytest.mark.parametrize("world_size,accum,expected", [
    (1, 1, (64, 1)), (2, 1, (32, 1)), (4, 1, (16, 1)), (2, 2, (16, 2)), (8, 1, (8, 1)),
])
def test_global_batch_split_keeps_64(world_size, accum, expected):
    from util.optim import per_process_batch

    batch, accum_iter = per_process_batch(64, world_size, accum)
    assert (batch, accum_iter) == expected
    assert batch * accum_iter * world_size == 64  # the paper's images per optimizer step


def test_global_batch_three_processes_refused_by_number():
    from util.optim import per_process_batch

    with pytest.raises(ValueError, match=r"global batch 64 does not divide over 3 processes") as err:
        per_process_batch(64, 3)
    assert "1, 2, 4, 8" in str(err.value) and "63 or 66" in str(err.value)
    assert per_process_batch(66, 3) == (22, 1)  # an explicit other global batch that divides
    assert per_process_batch(256, 4) == (64, 1)
    with pytest.raises(ValueError, match="world size must be positive"):
        per_process_batch(64, 0)
