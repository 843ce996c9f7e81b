"""Every flag of eval.py and visualize.py refuses a bad value where it is parsed: one line on stderr,
`SCRIPT: error: --flag VALUE: <what is allowed>` (argparse's own wording for values of the wrong
type or choice), exit status 2, and nothing written. main(argv) runs in-process; with a missing
check the same command would run and write its results or figure, so each case can fail.
The whole file takes a few seconds on 2 CPU cores."""
import os
import subprocess
import sys

import pytest

import eval as ev
import sit
import visualize

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
                     proj_dim=16, dataset="synthetic")
    sit.save_checkpoint(str(path), cfg, sit.SiT(cfg), epoch=1)
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
    err = refused(visualize, "visualize.py", [str(ckpt), "--attention", "--curves"], ckpt, capsys)
    assert "--curves" in err and "--attention" in err


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


@pytest.mark.parametrize("script,argv", [("eval.py", ["--mode", "knn", "--k", "0"]),
                                         ("visualize.py", ["--n", "0"])])
def test_command_line_exit_status_is_2(script, argv, ckpt):
    """The scripts as a user runs them: status 2, exactly one line, no traceback."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), str(ckpt), *argv],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"{script}: error: {argv[-2]} 0: must be an integer " +
                                     (">= 1" if script == "eval.py" else "in [1, 256]")]
