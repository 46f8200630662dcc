"""Config files: every shipped row resolves to the reference's settings, the references' own
YAML files are read as they are, unknown keys are refused, and `kdpipe run` shares stores."""

import json
from pathlib import Path

import pytest

from kdpipe.cli import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


@pytest.fixture(autouse=True)
def paths(monkeypatch, tmp_path):
    for var in ("KDPIPE_TEACHERS", "KDPIPE_CIFAR100", "KDPIPE_IMAGENET", "KDPIPE_TINYIMAGENET"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def printed(cli_runner, *args) -> dict:
    result = cli_runner.invoke(cli, ["train-student", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_every_shipped_config_resolves(cli_runner):
    assert len(SHIPPED) >= 80
    for path in SHIPPED:
        cfg = printed(cli_runner, "--config", str(path))
        for key in (
            "teacher_arch",
            "student",
            "method",
            "method_resolved",
            "epochs",
            "lr",
            "batch_size",
            "momentum",
            "weight_decay",
            "nesterov",
            "milestones",
            "lr_decay",
            "views",
        ):
            assert key in cfg, (path, key)


# (teacher, student) -> (beta, r, normalize, lr): GzyAftermath/CAT-KD configs/cifar100/CAT_KD/
CATKD_REFERENCE = {
    ("resnet110", "resnet32"): (1.8, 2, False, 0.05),  # res110_res32.yaml
    ("resnet56", "resnet20"): (0.7, 2, False, 0.05),  # res56_res20.yaml
    ("resnet32x4", "resnet8x4"): (15.0, 2, False, 0.05),  # res32x4_res8x4.yaml
    ("resnet32x4", "ShuffleV1"): (600.0, 4, True, 0.01),  # res32x4_shuv1.yaml
    ("resnet32x4", "ShuffleV2"): (600.0, 4, True, 0.01),  # res32x4_shuv2.yaml
    ("ResNet50", "MobileNetV2"): (40.0, 2, True, 0.01),  # res50_mv2.yaml
    ("vgg13", "MobileNetV2"): (15.0, 2, True, 0.01),  # vgg13_mv2.yaml
    ("vgg13", "vgg8"): (4.5, 2, False, 0.05),  # vgg13_vgg8.yaml
    ("wrn_40_2", "ShuffleV1"): (80.0, 4, True, 0.01),  # wrn40_2_shuv1.yaml
    ("wrn_40_2", "wrn_16_2"): (12.0, 2, False, 0.05),  # wrn_40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): (1.5, 2, False, 0.05),  # wrn_40_2_wrn_40_1.yaml
}


@pytest.mark.parametrize("pair", list(CATKD_REFERENCE))
def test_catkd_rows_equal_the_reference_configs(cli_runner, pair):
    beta, r, norm, lr = CATKD_REFERENCE[pair]
    cfg = printed(cli_runner, "--config", str(CONFIGS / "cifar100" / "cat_kd" / f"{pair[0]}-{pair[1]}.yaml"))
    m = cfg["method_resolved"]
    assert (m["beta"], m["resolution"], m["normalize"], m["ce_weight"]) == (beta, r, norm, 1.0)
    # every CAT_KD file: SOLVER batch 64, 240 epochs, [150, 180, 210] x0.1, wd 5e-4, momentum 0.9, SGD
    assert (
        cfg["lr"],
        cfg["batch_size"],
        cfg["epochs"],
        cfg["milestones"],
        cfg["lr_decay"],
        cfg["weight_decay"],
        cfg["momentum"],
        cfg["nesterov"],
        cfg["head"],
    ) == (lr, 64, 240, [150, 180, 210], 0.1, 5e-4, 0.9, False, "cam")
    # the defaults equal the reference too: the pair alone, without the file's method options
    alone = printed(cli_runner, "--student", pair[1], "--method", "cat_kd", "--data", "digits")
    assert alone["method_resolved"]["beta"] is None  # no teacher known: nothing bound
    bound = printed(
        cli_runner,
        "--config",
        str(CONFIGS / "cifar100" / "cat_kd" / f"{pair[0]}-{pair[1]}.yaml"),
        "--set",
        "student.method_options={}",
    )
    b = bound["method_resolved"]
    assert (b["beta"], b["resolution"], b["normalize"]) == (beta, r, norm) and bound["lr"] == lr


# letKD supplement Table 1 pairs; lr 0.01 for ShuffleNet/MobileNet students (letKD-framework LUT_lr),
# Nesterov, alphas (value_ratio) 1 except RN50 -> MNV2 penult 0.1 / inter 0.2
# (letKD-framework CIFAR100/cross_model/RN50_MNv2/letKD-2.py).
LETKD_REFERENCE = {
    ("wrn_40_2", "wrn_16_2"): (0.05, 1.0, 1.0, None),
    ("wrn_40_2", "wrn_40_1"): (0.05, 1.0, 1.0, None),
    ("resnet56", "resnet20"): (0.05, 1.0, 1.0, None),
    ("resnet110", "resnet20"): (0.05, 1.0, 1.0, None),
    ("resnet110", "resnet32"): (0.05, 1.0, 1.0, None),
    ("resnet32x4", "resnet8x4"): (0.05, 1.0, 1.0, None),
    ("wrn_40_2", "ShuffleV1"): (0.01, 1.0, 1.0, [4, 4]),
    ("resnet32x4", "ShuffleV1"): (0.01, 1.0, 1.0, [4, 4]),
    ("resnet32x4", "ShuffleV2"): (0.01, 1.0, 1.0, [4, 4]),
    ("ResNet50", "MobileNetV2"): (0.01, 0.1, 0.2, [2, 2]),
}


@pytest.mark.parametrize("pair", list(LETKD_REFERENCE))
def test_letkd_rows_equal_the_reference(cli_runner, pair):
    from kdpipe.config.config_files import load_row

    lr, a_penult, a_inter, grid = LETKD_REFERENCE[pair]
    for level in (1, 2):
        path = CONFIGS / "cifar100" / "letkd" / f"{pair[0]}-{pair[1]}-letkd{level}.yaml"
        cfg = printed(cli_runner, "--config", str(path))
        assert (
            cfg["lr"],
            cfg["nesterov"],
            cfg["batch_size"],
            cfg["epochs"],
            cfg["milestones"],
            cfg["weight_decay"],
        ) == (lr, True, 64, 240, [150, 180, 210], 5e-4)
        assert cfg["method_resolved"]["alpha_penult"] == a_penult
        if level == 2:
            assert cfg["method_resolved"]["alpha_inter"] == a_inter
        row = load_row(path, strict=False)
        assert row.extract["pad_mode"] == "reflect"  # letKD-framework cifar_dataset.py: padding_mode='reflect'
        assert row.cluster["k_penult"] == 4096 and row.cluster["k_inter"] == 8  # num_embeddings, 8 sub-classes
        assert row.cluster.get("student_grid") == grid


def test_a_reference_yaml_file_resolves_to_its_values(cli_runner, tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text("""
EXPERIMENT:
  NAME: "res32x4_shuv1"
  TAG: "res32x4_shuv1"
  PROJECT: "res32x4_shuv1"
DISTILLER:
  TYPE: "CAT_KD"
  TEACHER: "resnet32x4"
  STUDENT: "ShuffleV1"
SOLVER:
  BATCH_SIZE: 64
  EPOCHS: 240
  LR: 0.01
  LR_DECAY_STAGES: [150, 180, 210]
  LR_DECAY_RATE: 0.1
  WEIGHT_DECAY: 0.0005
  MOMENTUM: 0.9
  TYPE: "SGD"
LOG:
  WANDB: False
CAT_KD:
  LOSS:
    CAT_loss_weight: 600.
    CAM_RESOLUTION: 4
    CE_WEIGHT: 1.
  onlyCAT: False
  IF_NORMALIZE: True
  IF_OnlyTransferPartialCAMs: True
  CAMs_Nums: 75
  Strategy: 1
DATASET:
  REDUCTION: True
  RESERVED_RATE: 0.5
  RESERVED_CLASS_NUM: 99
if_test: True
device: 1
""")
    cfg = printed(cli_runner, "--config", str(path))
    m = cfg["method_resolved"]
    assert (cfg["teacher_arch"], cfg["student"], cfg["method"]) == ("resnet32x4", "ShuffleV1", "cat_kd")
    assert (m["beta"], m["resolution"], m["normalize"], m["ce_weight"], m["bottom_n"]) == (600.0, 4, True, 1.0, 76)
    assert (cfg["lr"], cfg["weight_decay"], cfg["milestones"], cfg["reserved_classes"], cfg["reserved_rate"]) == (
        0.01,
        5e-4,
        [150, 180, 210],
        99,
        0.5,
    )
    assert cfg["config_file"]["recorded"] == {
        "EXPERIMENT.NAME": "res32x4_shuv1",
        "EXPERIMENT.PROJECT": "res32x4_shuv1",
        "EXPERIMENT.TAG": "res32x4_shuv1",
        "LOG.WANDB": False,
        "device": 1,
        "if_test": True,
    }
    # the command line wins over the file
    assert printed(cli_runner, "--config", str(path), "--epochs", "3", "--beta", "5")["method_resolved"]["beta"] == 5
    # omitted keys take the reference's defaults (mdistiller/engine/cfg.py): WEIGHT_DECAY 1e-4, IF_NORMALIZE True
    short = tmp_path / "short.yaml"
    short.write_text('DISTILLER: {TYPE: "CAT_KD", TEACHER: "resnet32x4", STUDENT: "resnet8x4"}\n')
    cfg = printed(cli_runner, "--config", str(short))
    assert cfg["weight_decay"] == 1e-4 and cfg["method_resolved"]["normalize"] is True
    assert cfg["method_resolved"]["beta"] == 400.0


def test_unknown_keys_are_one_sentence(cli_runner, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('DISTILLER: {TYPE: "CAT_KD", TEACHER: "resnet32x4", STUDENT: "resnet8x4"}\nSOLVER: {LR_WARMUP: 5}\n')
    result = cli_runner.invoke(cli, ["train-student", "--config", str(bad), "--print-config"])
    assert result.exit_code == 2 and "SOLVER.LR_WARMUP" in result.output and "Traceback" not in result.output
    row = tmp_path / "row.yaml"
    row.write_text(
        "teacher: {arch: resnet8, checkpoint: x}\ndata: digits\nstudent: {student: resnet8, method: kd, epochz: 3}\n"
    )
    result = cli_runner.invoke(cli, ["train-student", "--config", str(row), "--print-config"])
    assert result.exit_code == 2 and "'epochz'" in result.output
    result = cli_runner.invoke(cli, ["run", str(row), "--set", "paperz.top1=3"])
    assert result.exit_code == 2 and "paperz" in result.output


def test_run_shares_stores_and_resumes(cli_runner, tiny_store, tmp_path, monkeypatch):
    from kdpipe.workflows.run import run_configs

    rows = []
    for method in ("kd", "cat_kd"):
        path = tmp_path / f"{method}.yaml"
        path.write_text(f"""
name: tiny-{method}
teacher: {{arch: resnet8, checkpoint: "{tiny_store["teacher"]}"}}
data: "{tiny_store["data"]}"
extract: {{views: "4", cam_res: [2], features: [], shard_size: 16}}
student: {{student: resnet8, method: {method}, method_options: {{}}, epochs: 1, batch_size: 16}}
seeds: [0, 1]
""")
        rows.append(str(path))
    first = run_configs(rows, out=tmp_path / "runs", stores=tmp_path / "stores", executor="inline", verbose=False)
    assert first["stores_built"] == 1 and len(first["stores"]) == 1
    assert [r["seeds"] for r in first["rows"]] == [2, 2]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 4
    second = run_configs(rows, out=tmp_path / "runs", stores=tmp_path / "stores", executor="inline", verbose=False)
    assert second["stores_built"] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == runs  # nothing retrained
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "| tiny-kd | resnet8 | resnet8 | kd | 2 |" in table


def test_imagenet_mobilenet_rows_train_the_references_mobilenet_v1(cli_runner, tmp_path):
    # CAT-KD configs/imagenet/CAT-KD/r50_mv2.yaml names its student "MobileNetV2" (a MobileNet
    # v1 in its model file); mdistiller configs/imagenet/r50_mv1/dkd.yaml names it MobileNetV1
    catkd = tmp_path / "r50_mv2.yaml"
    catkd.write_text(
        'DATASET: {TYPE: "imagenet"}\n'
        'DISTILLER: {TYPE: "CAT-KD", TEACHER: "ResNet50", STUDENT: "MobileNetV2"}\n'
        "SOLVER: {BATCH_SIZE: 512, EPOCHS: 100, LR: 0.2, LR_DECAY_STAGES: [30, 60, 90], WEIGHT_DECAY: 0.0001}\n"
        "CAT_KD: {LOSS: {CAT_loss_weight: 10., CAM_RESOLUTION: 2, CE_WEIGHT: 1.}, onlyCAT: False, IF_NORMALIZE: True}\n"
        "if_test: True\n"
    )
    cfg = printed(cli_runner, "--config", str(catkd))
    assert (cfg["teacher_arch"], cfg["student"]) == ("imagenet_resnet50", "imagenet_mobilenet_v1")
    assert cfg["method_resolved"]["beta"] == 10.0 and cfg["method_resolved"]["normalize"] is True
    dkd = tmp_path / "dkd.yaml"
    dkd.write_text(
        'DATASET: {TYPE: "imagenet"}\n'
        'DISTILLER: {TYPE: "DKD", TEACHER: "ResNet50", STUDENT: "MobileNetV1"}\n'
        "SOLVER: {BATCH_SIZE: 512, EPOCHS: 100, LR: 0.2, LR_DECAY_STAGES: [30, 60, 90], WEIGHT_DECAY: 0.0001}\n"
        "DKD: {CE_WEIGHT: 1.0, BETA: 2.0, T: 1.0, WARMUP: 1}\n"
    )
    cfg = printed(cli_runner, "--config", str(dkd))
    assert cfg["student"] == "imagenet_mobilenet_v1"
    # the file's DKD section (its reference pair's settings, REFERENCE_DKD, are the same)
    assert cfg["method_resolved"]["beta"] == 2.0 and cfg["method_resolved"]["temperature"] == 1.0
    # the shipped rows of that pair name the same network
    rows = sorted(CONFIGS.rglob("imagenet_resnet50-*.yaml"))
    assert len(rows) == 5
    assert all(printed(cli_runner, "--config", str(row))["student"] == "imagenet_mobilenet_v1" for row in rows)
