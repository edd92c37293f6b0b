"""CLI smoke tests (subprocess, tiny settings): help, demo, score, prune, and argparse-style
errors (exit 2, nothing written) for bad input."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from tolerances import F32_REORDERED, SPARSITY_ROUNDING, assert_close_rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_group(cmd, env, timeout):
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's
    workers included) so nothing is left behind."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return _run_group([sys.executable, "-m", "oba_ext.cli", *args], env, timeout)


TINY = ["--model", "small_cnn", "--dataset", "synthetic", "--image-size", "8", "--batch-size", "16",
        "--num-batches", "1", "--no-progress", "--impl", "reference"]


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for word in ("score", "prune", "demo", "info"):
        assert word in r.stdout
    r = run("prune", "--help")
    assert r.returncode == 0 and "--flops-ratio" in r.stdout and "--sparsity" in r.stdout


def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--out", str(out), "--train-epochs", "0.3", "--finetune-epochs", "0.1",
            "--num-batches", "1", "--no-progress", "--impl", "reference")
    assert r.returncode == 0, r.stderr[-3000:]
    for word in ("oba", "taylor", "magnitude", "acc tuned"):
        assert word in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["runs"]) >= {"oba", "taylor"}
    for f in rep["runs"].values():
        assert abs(f["target"]["achieved"] - 0.5) <= 0.015
        assert f["macs_after"] < rep["before"]["macs"]
    assert (out / "channels.png").stat().st_size > 1000 and (out / "scores.png").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_score_and_checkpoint(tmp_path):
    out, ckpt = tmp_path / "s", tmp_path / "ck.pt"
    r = run("score", *TINY, "--out", str(out), "--criterion", "taylor", "--checkpoint", str(ckpt),
            "--checkpoint-every", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    scores = torch.load(out / "scores.pt")
    assert "fc" in scores and scores["fc"]["out"].shape == (10,)
    assert json.loads((out / "scores.json").read_text())["criterion"] == "taylor"
    assert ckpt.exists()
    # the saved values are oba_ext.score's on the same model and batches (rebuilt in-process
    # from the same arguments and seed)
    import oba_ext
    from oba_ext.cli import build_parser
    from oba_ext.workflow import setup
    args = build_parser().parse_args(["score", *TINY, "--out", str(out), "--criterion", "taylor"])
    model, _, _, batches, _, _ = setup(args)
    want = oba_ext.score(model, batches, kind="taylor", granularity=tuple(args.granularity),
                         impl="reference", progress=False)
    assert set(scores) == set(want)
    for name in want:
        assert set(scores[name]) == set(want[name].by_key()) and "inp" not in scores[name]
        for key, t in want[name].by_key().items():
            assert_close_rel(scores[name][key], t, f"CLI {name}.{key}", rtol=F32_REORDERED)


def test_prune_unstructured_and_structured(tmp_path):
    r = run("prune", *TINY, "--out", str(tmp_path / "u"), "--sparsity", "0.5", "--criteria", "oba")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "u" / "report.json").read_text())
    assert rep["runs"]["oba"]["sparsity"] == pytest.approx(0.5, abs=SPARSITY_ROUNDING)
    r = run("prune", *TINY, "--out", str(tmp_path / "p"), "--params-ratio", "0.6", "--criteria",
            "taylor", "--save-model")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "p" / "pruned_taylor.pt").exists()


BAD_INPUT = [
    (["prune", "--flops-ratio", "1.5"], "--flops-ratio"),
    (["prune", "--flops-ratio", "0"], "--flops-ratio"),
    (["prune", "--flops-ratio", "0.5", "--criteria", "bogus"], "unknown criterion"),
    (["score", "--criterion", "bogus"], "unknown criterion"),
    (["prune", "--flops-ratio", "0.5", "--model", "no_such_net"], "no_such_net"),
    (["prune", "--flops-ratio", "0.5", "--dataset", "cifar10", "--data-root", "/nonexistent"],
     "cifar-10-batches-py"),
    (["prune", "--flops-ratio", "0.5", "--dataset", "cifar10"], "--data-root"),
    (["prune", "--flops-ratio", "0.5", "--sparsity", "0.5"], "exactly one"),
    (["prune", "--flops-ratio", "0.001"], "cannot reach"),
    (["prune", "--flops-ratio", "0.5", "--normalizer", "median"], "--normalizer"),
    (["prune", "--flops-ratio", "0.5", "--ignore", "no.such.layer"], "--ignore"),
]


def _argv(args, out):
    tiny = list(TINY)
    for flag in ("--model", "--dataset"):
        if flag in args:
            i = tiny.index(flag)
            del tiny[i:i + 2]
    return [args[0], *tiny, *args[1:], "--out", str(out)]


@pytest.mark.parametrize("args,needle", BAD_INPUT, ids=[b[1] for b in BAD_INPUT])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, needle):
    """In-process (``main(argv)``): argparse-style message, exit code 2, no output folder."""
    from oba_ext.cli import main
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(_argv(args, out))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert needle in err and "error:" in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bad_input_subprocess_exit_code(tmp_path):
    r = run(*_argv(["prune", "--flops-ratio", "2"], tmp_path / "o"))
    assert r.returncode == 2 and "--flops-ratio" in r.stderr
    assert os.listdir(tmp_path) == []


def test_weights_mismatch_exits_2(tmp_path, capsys):
    from oba_ext.cli import main
    from oba_ext.models import get_model
    w = tmp_path / "wrong.pt"
    torch.save(get_model("resnet20").state_dict(), w)
    with pytest.raises(SystemExit) as e:
        main(["prune", *TINY, "--weights", str(w), "--flops-ratio", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "wrong.pt" in err and "missing keys" in err
    assert not (tmp_path / "o").exists()


def test_torchrun_distributed_score(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "oba_ext.cli", "score", *TINY, "--num-batches", "2", "--criterion", "taylor",
           "--distributed", "--out", str(tmp_path / "d")]
    r = _run_group(cmd, env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "d" / "scores.json").read_text())
    assert meta["world_size"] == 2 and meta["num_batches"] == 2
    r1 = run("score", *TINY, "--num-batches", "2", "--criterion", "taylor", "--out", str(tmp_path / "s"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = torch.load(tmp_path / "d" / "scores.pt"), torch.load(tmp_path / "s" / "scores.pt")
    for name in b:
        for key in b[name]:
            assert_close_rel(a[name][key], b[name][key], f"{name}.{key}", rtol=F32_REORDERED)


def test_prune_on_a_cifar_folder_in_process(tmp_path, monkeypatch, capsys):
    """cifar10 in torchvision's folder format (generated), augmentation for fine-tuning,
    --pruning-ratio with two steps and fine-tuning in between."""
    from cifar_files import skip_md5_check, write_cifar
    from oba_ext.cli import main
    skip_md5_check(monkeypatch)  # generated files cannot match the official MD5s
    write_cifar(tmp_path / "data", n=8)
    out = tmp_path / "o"
    argv = ["prune", "--model", "small_cnn", "--dataset", "cifar10", "--data-root",
            str(tmp_path / "data"), "--batch-size", "8", "--num-batches", "1", "--pruning-ratio",
            "0.4", "--steps", "2", "--finetune-between", "0.2", "--finetune-epochs", "0.2",
            "--criteria", "taylor", "--impl", "reference", "--no-progress", "--save-model",
            "--out", str(out)]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    run_ = rep["runs"]["taylor"]
    assert run_["params_after"] < rep["before"]["params"]
    # the reported accuracy is the saved pruned model's top-1 on the 8 test images, recounted
    from oba_ext.cli import build_parser
    from oba_ext.workflow import setup
    pruned = torch.load(out / "pruned_taylor.pt", weights_only=False).eval()
    assert sum(p.numel() for p in pruned.parameters()) == run_["params_after"]
    test_loader = setup(build_parser().parse_args(argv))[2]
    correct = total = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((pruned(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 8 and run_["acc_after_finetune"] == correct / total
    assert "taylor" in capsys.readouterr().out


def test_score_criterion_options(tmp_path, capsys):
    """--criterion-option KEY=VALUE reaches score(criterion_options=...): the saved Hutchinson
    scores are oba_ext.score's with the same options (and differ from the defaults'); a bad
    option exits 2 naming the flag and the criterion's options, writing nothing."""
    import oba_ext
    from oba_ext.cli import build_parser, main
    from oba_ext.workflow import setup
    out = tmp_path / "h"
    argv = ["score", *TINY, "--out", str(out), "--criterion", "hessian_trace",
            "--criterion-option", "num_samples=3", "--criterion-option", "seed=7",
            "--criterion-option", "weighted=false"]
    assert main(argv) == 0
    saved = torch.load(out / "scores.pt")
    assert json.loads((out / "scores.json").read_text())["criterion_options"] == {
        "num_samples": 3, "seed": 7, "weighted": False}
    model, _, _, batches, _, _ = setup(build_parser().parse_args(argv))
    opts = {"num_samples": 3, "seed": 7, "weighted": False}
    want = oba_ext.score(model, batches, kind="hessian_trace", impl="reference", progress=False,
                         criterion_options=opts)
    default = oba_ext.score(model, batches, kind="hessian_trace", impl="reference",
                            progress=False)
    for key, t in want["fc"].by_key().items():
        assert_close_rel(saved["fc"][key], t, f"CLI hessian_trace fc.{key}", rtol=F32_REORDERED)
    assert not torch.allclose(default["fc"].out, want["fc"].out)
    from oba_ext.workflow import criterion_options
    assert criterion_options("hessian_trace", [" num_samples = 5", "weighted= TRUE"]) == {
        "num_samples": 5, "seed": 0, "weighted": True}
    for bad, msg in ((["--criterion-option", "samples=3"], "has no option 'samples'"),
                     (["--criterion-option", "num_samples"], "expected KEY=VALUE")):
        with pytest.raises(SystemExit) as e:
            main(["score", *TINY, "--out", str(tmp_path / "bad"), "--criterion",
                  "hessian_trace", *bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_score_recompute_flag(tmp_path):
    """``oba-ext score --recompute``: recorded in scores.json, and the engine's scores are
    bitwise those of the run without it (in-process, same arguments and seed)."""
    from oba_ext.cli import build_parser
    from oba_ext.workflow import run_score
    base = [a if a != "reference" else "kernel" for a in TINY] + ["--criterion", "oba"]
    got = {}
    for flag in ([], ["--recompute"]):
        out = tmp_path / ("r" if flag else "p")
        run_score(build_parser().parse_args(["score", *base, "--out", str(out), *flag]))
        got[bool(flag)] = torch.load(out / "scores.pt")
        assert json.loads((out / "scores.json").read_text())["recompute"] is bool(flag)
    assert set(got[True]) == set(got[False])
    for name, d in got[False].items():
        for key, t in d.items():
            assert torch.equal(got[True][name][key], t), (name, key)


def test_prune_recompute_reaches_the_scorer(tmp_path, monkeypatch):
    """``oba-ext prune --recompute`` passes recompute=True to every score() it makes."""
    import oba_ext.scoring as scoring
    from oba_ext.cli import build_parser
    from oba_ext.workflow import run_prune
    seen = []
    real = scoring.score

    def spy(*a, **kw):
        seen.append(kw.get("recompute"))
        return real(*a, **kw)
    monkeypatch.setattr(scoring, "score", spy)  # prune_unstructured imports it when called
    args = build_parser().parse_args(["prune", *TINY, "--out", str(tmp_path / "p"),
                                      "--sparsity", "0.5", "--criteria", "oba", "--recompute"])
    run_prune(args)
    assert seen and all(r is True for r in seen), seen
