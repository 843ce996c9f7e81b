"""Every flag of eval.py, visualize.py and train.py refuses a bad value where it is parsed: one line
on stderr, `SCRIPT: error: --flag VALUE: <what is allowed>` (argparse's own wording for values of the
wrong type or choice), exit status 2, and nothing written. main(argv) runs in-process; with a missing
check the same command would run and write its results, figure or run folder, so each case can fail.
The whole file takes a few seconds on 2 CPU cores."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
import runtime
import sit
import train
import visualize

SYNTHETIC = runtime.Run(dataset="synthetic")   # the dataset the checkpoints say they saw

HERE = os.path.dirname(os.path.abspath(__file__))
NO_VALUE = {"-h", "--help", "--random-init", "--mean-patch", "--raw-pixels", "--attention", "--curves"}

# flag: bad values; {dir} is an existing folder, {missing} a path that does not exist
EVAL_BAD = {
    "--mode": ["nope"],
    "--dataset": ["nope", "{missing}"],
    "--data-dir": [""],
    "--limit": ["-1", "ten"],
    "--device": ["tpu"],
    "--seed": ["-1", "4294967296", "1.5"],
    "--results": ["{dir}", ""],
    "--k": ["0", "-3"],
    "--probe-steps": ["0"],
    "--last-blocks": ["0", "-1", "1.5"],
    "--shots": ["0", "1,-5", "1,,5", "a", ""],
    "--seeds": ["0"],
    "--fewshot-wd": ["-1e-3", "nan", "inf"],
    "--epochs": ["0", "-2"],
    "--batch-size": ["0"],
    "--lr": ["0", "-1e-4", "nan", "inf"],
    "--min-lr": ["-1e-6"],
    "--warmup-epochs": ["-1", "nan"],
    "--weight-decay": ["-0.05"],
    "--layer-decay": ["0", "1.5", "-0.75"],
    "--drop-path": ["1", "-0.1"],
    "--crop-min": ["0", "1.2"],
    "--randaug-n": ["-1"],
    "--randaug-m": ["-1", "11"],
    "--randaug-mstd": ["-0.5"],
    "--reprob": ["-0.1", "1.5"],
    "--mixup": ["-0.8", "nan"],
    "--cutmix": ["-1", "inf"],
    "--mixup-prob": ["1.1"],
    "--mixup-switch-prob": ["-0.5"],
    "--smoothing": ["1.1", "-0.1"],
    "--time-budget": ["-1", "nan"],
    "--label-fraction": ["0", "1.5", "-0.1", "nan"],
    "--val-share": ["1", "-0.1"],
    "--recipe": ["nope"],
    "--head-init": ["zeros"],
}
VISUALIZE_BAD = {
    "--n": ["0", "-1", "257", "two"],
    "--seed": ["-1", "4294967296"],
    "--drop-perc": ["1.5", "-0.1", "nan"],
    "--drop-type": ["blur"],
    "--dataset": ["nope"],
    "--data-dir": [""],
    "--images": ["{missing}"],
    "--log": ["{missing}", "{dir}"],
    "--device": ["tpu"],
    "--out": ["{dir}", ""],
}
SCRIPTS = {"eval.py": (ev, EVAL_BAD, ["--mode", "knn", "--limit", "64"]),   # a quick run if unchecked
           "visualize.py": (visualize, VISUALIZE_BAD, ["--n", "2"])}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny SiT checkpoint on synthetic data, alone in its folder."""
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    cfg = sit.Config(model="tiny", dim=32, depth=2, heads=2, img_size=16, patch_size=4, proj_hidden=64,
                     proj_dim=16)
    runtime.save_checkpoint(str(path), cfg, sit.SiT(cfg), epoch=1, run=SYNTHETIC)
    return path


def flags_of(module):
    """Every option string of a script's parser."""
    return {s for action in module.make_parser()._actions for s in action.option_strings}


def shown(value):
    """How the message shows a value: as typed, or a float as Python's :g writes it."""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return f"{float(value):g}"
    except ValueError:
        return value


def refused(module, script, argv, ckpt, capsys):
    """Run main(argv): it must exit 2 with one stderr line and leave the run folder as it was."""
    before = sorted(os.listdir(ckpt.parent))
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, f"exit status {e.value.code}"
    assert err.startswith(f"{script}: error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(ckpt.parent)) == before, "something was written"
    return err


CASES = [(script, flag, value) for script, (_, bad, _) in SCRIPTS.items() for flag, values in bad.items()
         for value in values]


@pytest.mark.parametrize("script,flag,value", CASES, ids=[f"{s} {f} {v!r}" for s, f, v in CASES])
def test_bad_value_is_refused_where_parsed(script, flag, value, ckpt, tmp_path, capsys):
    module, _, quick = SCRIPTS[script]
    value = value.format(dir=tmp_path, missing=tmp_path / "missing")
    # --flag=VALUE: argparse would read a lone -1e-4 as an option, not as a value
    err = refused(module, script, [str(ckpt), *quick, f"{flag}={value}"], ckpt, capsys)
    assert flag in err and shown(value) in err, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_bad_values_here(script):
    """The table above covers every flag that takes a value, and every flag the script checks."""
    module, bad, _ = SCRIPTS[script]
    assert flags_of(module) - NO_VALUE == set(bad)
    assert set(module.FLAGS) <= set(bad)


def test_flag_combinations_are_refused(ckpt, capsys):
    err = refused(ev, "eval.py", [str(ckpt), "--mode", "finetune", "--raw-pixels", "--epochs", "1"], ckpt, capsys)
    assert "--raw-pixels" in err
    for flags in (["--mean-patch"], ["--last-blocks", "2"]):      # frozen features only: never dropped
        err = refused(ev, "eval.py", [str(ckpt), "--mode", "finetune", *flags, "--epochs", "1"], ckpt, capsys)
        assert flags[0] in err and "--mode finetune" in err
        err = refused(ev, "eval.py", [str(ckpt), "--mode", "knn", "--raw-pixels", *flags], ckpt, capsys)
        assert flags[0] in err and "--raw-pixels" in err
    err = refused(visualize, "visualize.py", [str(ckpt), "--attention", "--curves"], ckpt, capsys)
    assert "--curves" in err and "--attention" in err
    for flags in (["--recipe", "short"], ["--time-budget", "1"], ["--head-init", "probe"]):   # fine-tuning only
        err = refused(ev, "eval.py", [str(ckpt), "--mode", "knn", *flags], ckpt, capsys)
        assert err == f"eval.py: error: {flags[0]}: for --mode finetune, not for --mode knn\n"


def test_good_edge_values_pass_the_checks(ckpt):
    """The ends of each allowed range are accepted (parse only)."""
    args = ev.parse_args([str(ckpt), "--mode", "finetune", "--layer-decay", "1", "--drop-path", "0",
                          "--reprob", "1", "--smoothing", "0", "--mixup", "0", "--cutmix", "0",
                          "--crop-min", "1", "--randaug-n", "0", "--randaug-m", "10", "--limit", "0",
                          "--seed", "4294967295", "--warmup-epochs", "0", "--shots", "1, 5"])
    assert args.layer_decay == 1.0 and args.shots == [1, 5]
    args = visualize.parse_args([str(ckpt), "--n", "256", "--drop-perc", "0", "--seed", "0"])
    assert args.n == 256


def test_bounds_and_values_are_written_in_full(ckpt, capsys):
    """An integer bound or value as typed (not 4.29497e+09); a float value as :g writes it."""
    err = refused(visualize, "visualize.py", [str(ckpt), "--seed", "4294967296"], ckpt, capsys)
    assert err == "visualize.py: error: --seed 4294967296: must be an integer in [0, 4294967295]\n"
    err = refused(ev, "eval.py", [str(ckpt), "--mode", "knn", "--lr=-1e-4"], ckpt, capsys)
    assert err == "eval.py: error: --lr -0.0001: must be a number > 0\n"


# --- train.py: its flags are sit.Config's fields, each checked against the rule beside it ---------

# flag: bad values; {missing} is a path that does not exist, {file} an existing file
TRAIN_BAD = {
    "--model": ["huge"],
    "--dim": ["-1"],
    "--depth": ["-1"],
    "--heads": ["-2"],
    "--mlp-ratio": ["0", "65", "nan"],
    "--img-size": ["0", "-32"],
    "--patch-size": ["0", "-4"],
    "--in-chans": ["1"],
    "--crop-min": ["0", "1.5", "nan"],
    "--drop-path": ["1", "-0.1"],
    "--proj-hidden": ["0"],
    "--proj-dim": ["0"],
    "--drop-perc": ["1.5", "-0.1", "nan"],
    "--drop-replace": ["1.1", "-0.3"],
    "--drop-align": ["-4"],
    "--drop-type": ["blur"],
    "--max-block": ["0", "1.5"],
    "--alpha": ["-1", "inf"],
    "--tau": ["0", "-0.2"],
    "--epochs": ["0", "-2", "ten"],
    "--batch-size": ["1", "0"],
    "--lr": ["0", "-1e-4", "nan", "inf"],
    "--min-lr": ["-1e-6"],
    "--warmup-epochs": ["-1", "nan"],
    "--weight-decay": ["-0.04"],
    "--weight-decay-end": ["-0.1"],
    "--momentum-teacher": ["1.2", "-0.1"],
    "--clip-grad": ["-3"],
    "--clip-mode": ["norm"],
    "--head-bn": ["batch"],
    "--dataset": ["nope", "{missing}"],
    "--data-dir": [""],
    "--limit": ["-1"],
    "--workers": ["-1"],
    "--out": ["{file}"],
    "--device": ["tpu"],
    "--save-every": ["-1", "nan"],
    "--time-budget": ["-1", "inf"],
    "--knn-every": ["-1"],
    "--log-every": ["0"],
    "--bench": ["-1"],
    "--peak-tflops": ["-1", "nan"],
    "--seed": ["-1", "4294967296", "1.5"],
    "--recipe": ["nope"],
}
# a two-step run if a check were missing (no --warmup-epochs note: it would be a second line)
TRAIN_QUICK = ["--dataset", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs", "1",
               "--warmup-epochs", "0", "--model", "tiny", "--dim", "32", "--depth", "2", "--heads", "2",
               "--img-size", "16", "--proj-hidden", "64", "--proj-dim", "16", "--device", "cpu", "--knn-every", "0"]
CONFIG_FIELDS = {f"--{f.name.replace('_', '-')}": f
                 for f in dataclasses.fields(sit.Config) + dataclasses.fields(runtime.Run)}
TRAIN_CASES = [(flag, value) for flag, values in TRAIN_BAD.items() for value in values]


def of_its_type(flag, value):
    """Whether argparse reads `value` as the flag's type (else argparse itself refuses it)."""
    try:
        {"int": int, "float": float}.get(CONFIG_FIELDS[flag].type, CONFIG_FIELDS[flag].type)(value)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("flag,value", TRAIN_CASES, ids=[f"train.py {f} {v!r}" for f, v in TRAIN_CASES])
def test_train_bad_value_is_refused_before_anything_is_written(flag, value, tmp_path, capsys):
    """train.main returns 2 (argparse: exits 2, for a value of the wrong type) with one stderr line
    naming the flag and the value; the run folder is not created and nothing else is written."""
    (tmp_path / "afile").write_text("kept")
    value = value.format(missing=tmp_path / "missing", file=tmp_path / "afile")
    out = tmp_path / "run"
    argv = [*TRAIN_QUICK, "--out", str(out), f"{flag}={value}"]   # the last --out or --dataset wins
    if of_its_type(flag, value):
        status = train.main(argv)
    else:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        status = e.value.code
    err = capsys.readouterr().err
    assert status == 2, f"exit status {status}"
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and "\r" not in err, err
    assert flag in err and shown(value) in err, err
    assert sorted(os.listdir(tmp_path)) == ["afile"] and (tmp_path / "afile").read_text() == "kept"


def test_every_train_flag_has_bad_values_here():
    """The table above covers every field of sit.Config and runtime.Run that takes a value, and
    runtime.TRAIN_FLAGS gives each field its help and rule, so a new field needs both."""
    takes_value = {flag for flag, f in CONFIG_FIELDS.items() if f.type not in (bool, "bool")}
    assert set(TRAIN_BAD) == takes_value
    assert set(runtime.TRAIN_FLAGS) == {f.name for f in CONFIG_FIELDS.values()}
    unruled = {flag for flag in takes_value if runtime.TRAIN_FLAGS[CONFIG_FIELDS[flag].name][1] is runtime.ANY}
    assert unruled == set()


@pytest.mark.parametrize("script,argv", [("eval.py", ["--mode", "knn", "--k", "0"]),
                                         ("visualize.py", ["--n", "0"])])
def test_command_line_exit_status_is_2(script, argv, ckpt):
    """The scripts as a user runs them: status 2, exactly one line, no traceback."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), str(ckpt), *argv],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"{script}: error: {argv[-2]} 0: must be an integer " +
                                     (">= 1" if script == "eval.py" else "in [1, 256]")]


def test_train_command_line_exit_status_is_2(tmp_path):
    """train.py as a user runs it: status 2, exactly one line, no traceback, no run folder."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--out", str(tmp_path / "run"),
                        "--patch-size", "0"], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["train.py: error: --patch-size 0: must be an integer >= 1"]
    assert not (tmp_path / "run").exists()


# --- recipes: named sets of flag values, which flags given override ---------------------------------

def test_train_recipes_set_their_values_and_a_flag_overrides_them():
    """--recipe fmnist-20min gives the laptop recipe's values (written out here); a flag given wins; the
    name is a field of the run (config.json and the checkpoint hold it); its default folder is runs/NAME."""
    cfg, run, given = runtime.parse_train_args(["--recipe", "fmnist-20min"])
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.img_size, cfg.patch_size, cfg.proj_hidden, cfg.batch_size) == \
        (96, 4, 4, 28, 7, 1024, 64)
    assert (cfg.lr, cfg.alpha, cfg.momentum_teacher, cfg.crop_min, cfg.warmup_epochs, cfg.epochs) == \
        (4e-3, 1.0, 0.98, 1.0, 1.0, 100)
    assert (run.dataset, run.device, run.time_budget, run.knn_every, run.recipe, run.out) == \
        ("fashion-mnist", "cpu", 20.0, 0, "fmnist-20min", os.path.join("runs", "fmnist-20min"))
    assert given == {"recipe"}                                       # recipe values are not flags given
    cfg, run, given = runtime.parse_train_args(["--recipe", "fmnist-20min", "--dim", "64", "--time-budget", "3"])
    assert (cfg.dim, cfg.depth, run.time_budget) == (64, 4, 3.0) and given == {"recipe", "dim", "time_budget"}
    cfg, run, _ = runtime.parse_train_args(["--recipe", "fmnist-gpu-6min"])
    assert (cfg.dim, cfg.img_size, cfg.patch_size, cfg.batch_size, run.time_budget, run.device) == \
        (192, 32, 4, 256, 6.0, "auto")
    cfg, run, _ = runtime.parse_train_args(["--recipe", "cifar10-paper"])
    assert (run.dataset, cfg.dim, cfg.alpha) == ("cifar10", 384, 5.0)


@pytest.mark.parametrize("name", sorted(runtime.RECIPES))
def test_every_recipe_value_is_of_its_flags_type_and_passes_its_check(name):
    """A recipe's values pass the same checks as the flags (they are parsed as defaults, then checked)."""
    for field, value in runtime.RECIPES[name][2].items():
        kind = CONFIG_FIELDS[f"--{field.replace('_', '-')}"].type
        assert type(value).__name__ == getattr(kind, "__name__", kind), (field, value)
        assert runtime.bad_value(field, value, runtime.TRAIN_FLAGS[field][1]) is None, (field, value)


def test_a_recipe_value_that_breaks_its_rule_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(runtime.RECIPES, "broken", ("", "", dict(runtime.LAPTOP, lr=-1.0)))
    assert train.main(["--recipe", "broken", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "train.py: error: --lr -1: must be a number > 0\n"
    assert not (tmp_path / "run").exists()


def test_train_help_lists_every_recipe_with_its_result():
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    listed = p.stdout[p.stdout.index("recipes (--recipe NAME):"):].splitlines()[1:]
    assert [line.split()[0] for line in listed] == list(runtime.RECIPES)
    for line, (text, result, _) in zip(listed, runtime.RECIPES.values()):
        assert line.endswith(f"{text}; {result}")


def test_an_unknown_recipe_is_one_line_naming_the_known_ones(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--recipe", "fast", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["train.py: error: --recipe fast: must be one of cifar10-paper, fmnist-20min, "
                                     "fmnist-2min, fmnist-gpu-6min"]


def test_the_short_finetuning_recipe_and_a_flag_over_it(ckpt):
    """--recipe short (written out here): batch 64, whole-image crops, no RandAugment, erasing or mixing, 1
    warm-up epoch, lr 3e-3, the head from the linear probe; the rest are the defaults; a flag given wins. The
    default recipe is mae (MAE's, a random head)."""
    args = ev.parse_args([str(ckpt), "--mode", "finetune", "--recipe", "short", "--batch-size", "32"])
    assert (args.crop_min, args.randaug_n, args.reprob, args.mixup, args.cutmix, args.warmup_epochs, args.lr,
            args.head_init) == (1.0, 0, 0.0, 0.0, 0.0, 1.0, 3e-3, "probe")
    assert args.batch_size == 32
    assert ev.parse_args([str(ckpt), "--mode", "finetune", "--recipe", "short"]).batch_size == 64
    assert (args.smoothing, args.layer_decay, args.drop_path, args.weight_decay, args.epochs) == \
        (0.1, 0.75, 0.1, 0.05, 100)
    args = ev.parse_args([str(ckpt), "--mode", "finetune"])
    assert (args.recipe, args.crop_min, args.randaug_n, args.mixup, args.lr, args.head_init) == (
        "mae", 0.08, 2, 0.8, 5e-4, "random")
    assert ev.parse_args([str(ckpt), "--mode", "finetune", "--recipe", "short", "--head-init", "random"]).head_init \
        == "random"


def test_the_recipe_is_recorded_and_resume_keeps_it(tmp_path, capsys):
    """The recipe's name is in config.json and the checkpoint; --resume keeps it (and its values) without
    being told, and refuses another recipe in one line."""
    out = str(tmp_path / "run")
    assert TRAIN_QUICK[-2:] == ["--knn-every", "0"]
    quick = TRAIN_QUICK[:-2] + ["--patch-size", "4", "--time-budget", "0", "--out", out]  # given: they win
    assert train.main(["--recipe", "fmnist-2min", *quick]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["recipe"] == "fmnist-2min"
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["recipe"] == "fmnist-2min" and ckpt["config"]["momentum_teacher"] == 0.98
    assert train.main(["--out", out, "--resume", "--epochs", "2"]) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["recipe"] == "fmnist-2min" and ckpt["config"]["momentum_teacher"] == 0.98
    assert ckpt["config"]["knn_every"] == 0          # how it runs, too, is its recipe's (the default is 10)
    assert ckpt["step"] == 4
    capsys.readouterr()
    assert train.main(["--out", out, "--resume", "--epochs", "3", "--recipe", "fmnist-20min"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --recipe fmnist-20min: the run in") and err.count("\n") == 1, err
