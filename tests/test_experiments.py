"""Every experiment end to end at --smoke size: outputs, checkpoints, clear failures.

``--smoke`` alone (no --dataset or --model) runs on the embedded digits, so
most runs below pass just that.
"""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sfpk_jax
from experiments import cifar100_oneshot, harness, imagenet_iterative, pretrain
from experiments.harness import rundir
from sfpk_jax.storage import checkpoint_files as checkpoints

pytestmark = pytest.mark.slow

FAST = ["--smoke", "--no-progress"]
RESULT_KEYS = {"final_acc", "mean_last5_acc", "best_acc", "dense_acc", "acc_pruned", "pruner",
               "sparsity", "achieved_sparsity", "sparsity_per_layer", "mask_digest", "prune_seconds",
               "retrain_seconds"}


def _cifar100_python(root, train=300, test=150, seed=0):
    """A tiny cifar-100-python folder in the real pickle format."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", train), ("test", test)):
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": rng.integers(0, 100, n).tolist(),
                b"coarse_labels": rng.integers(0, 20, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)
    return root


def _results(out):
    return json.loads((out / "results.json").read_text())


def _metrics(out):
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_pretrain_then_oneshot_on_digits(tmp_path):
    dense_out = tmp_path / "dense"
    assert pretrain.main(["--out", str(dense_out), *FAST]) == 0
    ckpt = dense_out / "checkpoints" / "dense"
    dense = _results(dense_out)
    assert ckpt.is_dir() and dense["achieved_sparsity"] == 0.0
    assert dense["dense_acc"] == dense["final_acc"] == float(_metrics(dense_out)[-1]["test_acc"])
    out = tmp_path / "oneshot"
    assert cifar100_oneshot.main(["--dense-checkpoint", str(ckpt), "--sparsity", "0.9",
                                  "--out", str(out), *FAST]) == 0
    results = _results(out)
    assert RESULT_KEYS <= set(results)
    assert results["dense_acc"] == pytest.approx(dense["final_acc"])  # the same model, evaluated
    assert results["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert len(results["mask_digest"]) == 64
    rows = _metrics(out)
    assert [r["phase"] for r in rows] == ["retrain", "retrain"]
    accs = [float(r["test_acc"]) for r in rows]
    # final_acc is the saved final model's: the last epoch; the mean is its own key.
    assert results["final_acc"] == accs[-1]
    assert results["mean_last5_acc"] == pytest.approx(np.mean(accs))
    assert results["best_acc"] == max(accs)
    for name in ("accuracy.png", "sparsity_per_layer.png", "sfpk_trace.png", "config.json"):
        assert (out / name).stat().st_size > 0
    final = checkpoints.restore(out / "checkpoints" / "final")
    kernel = final["variables"]["params"]["Conv_1"]["kernel"]
    mask = final["masks"]["Conv_1"]["kernel"]
    assert np.all(np.asarray(kernel)[np.asarray(mask) == 0] == 0)


def test_oneshot_on_generated_cifar100_python_folder(tmp_path):
    data_dir = _cifar100_python(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--data-dir", str(data_dir), "--model", "small_cnn", "--pretrain-epochs", "1",
            "--out", str(out), *FAST]
    assert cifar100_oneshot.main(argv) == 0
    results = _results(out)
    assert results["achieved_sparsity"] == pytest.approx(0.95, abs=1e-3)
    assert (out / "checkpoints" / "dense").is_dir() and (out / "checkpoints" / "pruned").is_dir()
    again = tmp_path / "again"
    assert cifar100_oneshot.main([*argv[:-len(FAST) - 2], "--out", str(again), *FAST]) == 0
    assert _results(again)["mask_digest"] == results["mask_digest"]


def test_iterative_carries_particles_across_rounds(tmp_path):
    out = tmp_path / "it"
    assert imagenet_iterative.main(["--out", str(out), *FAST]) == 0
    results = _results(out)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    first, last = results["rounds"]
    assert first["sparsity"] == pytest.approx(1 - 0.1 ** 0.5)
    assert last["sparsity"] == pytest.approx(0.9)
    assert results["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_iterative_to_2_4_prunes_its_first_round_unstructured_and_its_last_to_the_pattern(
        tmp_path):
    # The first round's sparsity has no N:M pattern: it prunes the kernels the pattern groups
    # unstructured; the last keeps 2 of each group's surviving 4.
    out = tmp_path / "nm"
    assert imagenet_iterative.main(["--n-m", "2:4", "--out", str(out), *FAST]) == 0
    results = _results(out)
    assert [r["sparsity"] for r in results["rounds"]] == pytest.approx([1 - 0.5 ** 0.5, 0.5])
    assert results["achieved_sparsity"] >= 0.5
    final = checkpoints.restore(out / "checkpoints" / "final")
    assert sfpk_jax.is_n_m(final["masks"], "2:4", final["variables"]["params"]) == ()


def test_iterative_accumulates_gradients(tmp_path):
    out = tmp_path / "acc"
    assert imagenet_iterative.main(["--dataset", "digits", "--model", "small_cnn", "--pruner",
                                    "magnitude", "--pretrain-epochs", "1", "--accum-steps", "2",
                                    "--out", str(out), *FAST]) == 0
    assert _results(out)["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_accumulation_must_divide_the_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        imagenet_iterative.main(["--dataset", "digits", "--batch-size", "30", "--accum-steps", "4",
                                 "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--accum-steps" in capsys.readouterr().err


def test_missing_dataset_stops_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--data-dir", str(data_dir), "--pretrain-epochs", "1",
                               "--out", str(out), *FAST])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and "Traceback" not in err
    assert not out.exists()


def test_no_dense_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--dataset", "digits", "--model", "small_cnn",
                               "--out", str(tmp_path / "o"), "--no-progress"])
    assert exc.value.code == 2
    assert "--dense-checkpoint" in capsys.readouterr().err


DIGITS = ["--dataset", "digits", "--model", "small_cnn", "--pretrain-epochs", "1"]

# (experiment, flags, the flag the message must name, text the message must show).
# "{tmp}" is the test's folder; "{file}" an existing file and "{dir}" an existing folder.
BAD_FLAGS = [
    ("oneshot", ["--sparsity", "1.5"], "--sparsity", "1.5"),
    ("oneshot", ["--sparsity", "0"], "--sparsity", "(0, 1)"),
    ("oneshot", ["--sparsity", "1"], "--sparsity", "1.0"),
    ("oneshot", ["--sparsity", "nan"], "--sparsity", "nan"),
    ("oneshot", ["--steps", "0"], "--steps", ">= 1"),
    ("oneshot", ["--steps", "abc"], "--steps", "abc"),
    ("oneshot", ["--particles", "0"], "--particles", ">= 1"),
    ("oneshot", ["--prune-batch-size", "0"], "--prune-batch-size", ">= 1"),
    ("oneshot", ["--batch-size", "0"], "--batch-size", ">= 1"),
    ("oneshot", ["--batch-size", "5000"], "--batch-size", "1347 training examples"),
    ("oneshot", ["--prune-batch-size", "5000"], "--prune-batch-size", "1347"),
    ("oneshot", ["--epochs", "0"], "--epochs", ">= 1"),
    ("oneshot", ["--bn-batches", "0"], "--bn-batches", ">= 1"),
    ("oneshot", ["--checkpoint-every", "0"], "--checkpoint-every", ">= 1"),
    ("oneshot", ["--radius", "0.9"], "--radius", ">= 1"),
    ("oneshot", ["--repulsion", "-1"], "--repulsion", ">= 0"),
    ("oneshot", ["--vote-ratio", "0"], "--vote-ratio", "(0, 1]"),
    ("oneshot", ["--vote-momentum", "-0.5"], "--vote-momentum", ">= 0"),
    ("oneshot", ["--model", "resnet1000"], "--model", "small_cnn"),
    ("oneshot", ["--pruner", "oracle"], "--pruner", "magnitude"),
    ("oneshot", ["--dataset", "mnist"], "--dataset", "cifar100"),
    ("oneshot", ["--scope", "galactic"], "--scope", "local"),
    ("oneshot", ["--schedule", "cubic"], "--schedule", "cubic"),
    ("oneshot", ["--sparsity-fn", "l3"], "--sparsity-fn", "l3"),
    ("oneshot", ["--polarizer", "sigmoidal"], "--polarizer", "onehot"),
    ("oneshot", ["--repulsion-mode", "sin"], "--repulsion-mode", "exp"),
    ("oneshot", ["--vote-mode", "loud"], "--vote-mode", "soft"),
    ("oneshot", ["--particle-mode", "pmap"], "--particle-mode", "vmap"),
    ("oneshot", ["--particle-chunk", "0"], "--particle-chunk", ">= 1"),
    ("oneshot", ["--compute-dtype", "float16"], "--compute-dtype", "bfloat16"),
    ("oneshot", ["--synflow-iterations", "0"], "--synflow-iterations", ">= 1"),
    ("oneshot", ["--mesh-batch", "0"], "--mesh-batch", ">= 1"),
    ("oneshot", ["--mesh-batch", "2", "--particle-mode", "shard"], "--mesh-batch",
     "at most the 1 devices"),
    ("oneshot", ["--mask-dim", "diag"], "--mask-dim", "diag"),
    ("oneshot", ["--mask-dim", "out"], "--mask-dim", "local"),
    ("oneshot", ["--seed", "-1"], "--seed", "an integer in [0, "),
    ("oneshot", ["--data-workers", "-1"], "--data-workers", "in [0, "),
    ("oneshot", ["--conv-chunk", "-1"], "--conv-chunk", ">= 0"),
    ("oneshot", ["--n-m", "2/4"], "--n-m", "'2/4'"),
    ("oneshot", ["--n-m", "0:4"], "--n-m", "0 < N < M"),
    ("oneshot", ["--n-m", "5:4"], "--n-m", "0 < N < M"),
    ("oneshot", ["--n-m", "2:7"], "--n-m", "7"),
    ("oneshot", ["--n-m", "2:4", "--sparsity", "0.9"], "--n-m", "leave --sparsity out"),
    ("oneshot", ["--n-m", "2:4", "--mask-dim", "out"], "--n-m", "contradict"),
    ("iterative", ["--n-m", "x"], "--n-m", "'x'"),
    ("pretrain", ["--checkpoint-steps", "0"], "--checkpoint-steps", ">= 1"),
    ("oneshot", ["--pretrain-epochs", "-1"], "--pretrain-epochs", ">= 0"),
    ("oneshot", ["--pretrain-epochs", "0"], "--dense-checkpoint", "no dense model"),
    ("oneshot", ["--lr", "0"], "--lr", "> 0"),
    ("oneshot", ["--lr", "inf"], "--lr", "finite"),
    ("oneshot", ["--momentum", "1"], "--momentum", "[0, 1)"),
    ("oneshot", ["--weight-decay", "-1"], "--weight-decay", ">= 0"),
    ("oneshot", ["--warmup-epochs", "-1"], "--warmup-epochs", ">= 0"),
    ("oneshot", ["--warmup-start", "-1"], "--warmup-start", ">= 0"),
    ("oneshot", ["--label-smoothing", "1"], "--label-smoothing", "[0, 1)"),
    ("oneshot", ["--data-dir", "{tmp}/nowhere"], "--data-dir", "existing directory"),
    ("oneshot", ["--dense-checkpoint", "{tmp}/nockpt"], "--dense-checkpoint", "existing"),
    ("oneshot", ["--resume", "--overwrite"], "--resume", "--overwrite"),
    ("oneshot", ["--resume"], "--resume", "nothing to resume"),
    ("oneshot", ["--bogus"], "--bogus", "unrecognized"),
    ("pretrain", ["--epochs", "-3"], "--epochs", "-3"),
    ("iterative", ["--rounds", "0"], "--rounds", ">= 1"),
    ("iterative", ["--round-epochs", "0"], "--round-epochs", ">= 1"),
    ("iterative", ["--accum-steps", "0"], "--accum-steps", ">= 1"),
    ("iterative", ["--batch-size", "30", "--accum-steps", "4"], "--accum-steps", "30"),
    ("iterative", ["--pretrained-weights", "{tmp}/w.safetensors"], "--pretrained-weights",
     "existing file"),
    ("iterative", ["--pretrained-weights", "{file}", "--dense-checkpoint", "{dir}"],
     "--dense-checkpoint", "one source"),
    ("compare", ["--pruners", "sfpk,oracle"], "--pruners", "oracle"),
    ("compare", ["--pruners", "sfpk,sfpk"], "--pruners", "each once"),
    ("compare", ["--sparsities", "0.9,1.2"], "--sparsities", "(0, 1)"),
    ("compare", ["--sparsities", "x"], "--sparsities", "'x'"),
    ("compare", ["--sparsities", "0.9,0.9"], "--sparsities", "each once"),
    ("compare", ["--seeds", "0,-1"], "--seeds", ">= 0"),
    ("compare", ["--seeds", "a"], "--seeds", "'a'"),
    ("compare", ["--seeds", "0,0"], "--seeds", "each once"),
    ("compare", ["--pretrain-lr", "0"], "--pretrain-lr", "> 0"),
    ("compare", ["--pretrain-epochs", "0"], "--pretrain-epochs", "trained here"),
    ("compare", ["--synflow-iterations", "0"], "--synflow-iterations", ">= 1"),
    ("demo", ["--sparsities", "0.9,0.9"], "--sparsities", "each once"),
    ("demo", ["--batch-size", "5000"], "--batch-size", "1347"),
    ("demo", ["--seed", "-2"], "--seed", ">= 0"),
    ("demo", ["--lr", "nan"], "--lr", "nan"),
    ("demo", ["--repulsion", "-1"], "--repulsion", ">= 0"),
    ("demo", ["--bogus"], "--bogus", "unrecognized"),
    ("demo", ["--n-m", "2:4,5:4"], "--n-m", "0 < N < M"),
    ("demo", ["--n-m", "2:4", "--sparsities", "0.5"], "--n-m", "contradict"),
]


def _experiment(name):
    from benchmarks import compare_pruners
    from experiments import demo
    bases = {"oneshot": (cifar100_oneshot, DIGITS), "pretrain": (pretrain, DIGITS[:4]),
             "iterative": (imagenet_iterative, DIGITS), "compare": (compare_pruners, []),
             "demo": (demo, [])}
    return bases[name]


@pytest.mark.parametrize("name, flags, named, shown", BAD_FLAGS,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(tmp_path, capsys, name, flags, named,
                                                         shown):
    module, base = _experiment(name)
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "ckpt").mkdir()
    fill = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "weights.safetensors"),
            "{dir}": str(tmp_path / "ckpt")}
    flags = [fill.get(f, f.replace("{tmp}", str(tmp_path))) for f in flags]
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        module.main(["--out", str(out), *base, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert named in err and shown in err, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_unusable_out_dir_is_refused_before_any_work(tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        # /proc takes no new files, even as root (chmod would not stop root).
        out = Path("/proc/sfpk-test-run")
    with pytest.raises(SystemExit) as exc:
        pretrain.main([*DIGITS[:4], "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and str(out) in err


def test_model_without_prunable_weights_is_refused(tmp_path, capsys, monkeypatch):
    import flax.linen as nn
    import jax.numpy as jnp

    from sfpk_jax.models import registry

    class Scale(nn.Module):  # a per-class bias only: nothing a pruner would touch
        num_classes: int

        @nn.compact
        def __call__(self, x, train=False):
            bias = self.param("class_bias", nn.initializers.zeros, (self.num_classes,))
            return jnp.zeros((x.shape[0], self.num_classes)) + bias[None, :]

    monkeypatch.setitem(registry._REGISTRY, "bias_only", (lambda n: Scale(n), (1, 8, 8, 1)))
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--dataset", "digits", "--model", "bias_only", "--pretrain-epochs",
                               "1", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "prunable" in err
    assert not out.exists()


def _config_only_run(tmp_path, argv):
    """An --out holding just the config.json of a run of ``argv`` (as if killed at once)."""
    args = cifar100_oneshot.parse_args(argv)
    harness.start(args)
    return Path(args.out)


def test_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys):
    argv = [*DIGITS, *FAST, "--out", str(tmp_path / "o")]
    out = _config_only_run(tmp_path, argv)
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "interrupted run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "config.json").exists()


def test_resume_with_other_flags_lists_every_difference(tmp_path, capsys):
    argv = [*DIGITS, *FAST, "--out", str(tmp_path / "o")]
    out = _config_only_run(tmp_path, argv)
    before = (out / "config.json").read_text()
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main([*argv, "--resume", "--sparsity", "0.9", "--seed", "3",
                               "--checkpoint-every", "5", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--sparsity was 0.95, now 0.9" in err and "--seed was 0, now 3" in err
    assert "--checkpoint-every" not in err  # changes nothing computed
    assert (out / "config.json").read_text() == before


def test_resume_may_change_how_a_run_executes_but_not_what_it_computes(tmp_path, capsys):
    """The execution flags (their own group of --help) may change on --resume, announced and
    recorded; a flag of what SFPK computes may not, and is named."""
    argv = [*DIGITS, *FAST, "--out", str(tmp_path / "o")]
    out = _config_only_run(tmp_path, argv)
    with pytest.raises(SystemExit) as exc:
        harness.start(cifar100_oneshot.parse_args([*argv, "--resume", "--vote-momentum", "0.2",
                                                   "--particle-mode", "vmap"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--vote-momentum was 0.1, now 0.2" in err and "--particle-mode" not in err
    harness.start(cifar100_oneshot.parse_args([*argv, "--resume", "--particle-mode", "vmap",
                                               "--compute-dtype", "bfloat16"]))
    err = capsys.readouterr().err
    assert "warning: resuming with --particle-mode='vmap' (the run used 'auto')" in err
    assert "--compute-dtype='bfloat16'" in err
    changes = json.loads((out / "config.json").read_text())["resume_changes"]
    assert {c["flag"] for c in changes} == {"--particle-mode", "--compute-dtype"}


def test_resume_of_a_finished_run_does_nothing(tmp_path, capsys):
    argv = [*DIGITS, *FAST, "--out", str(tmp_path / "o")]
    out = _config_only_run(tmp_path, argv)
    (out / "results.json").write_text('{"final_acc": 0.5}')
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main([*argv, "--resume"])
    assert exc.value.code == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"final_acc": 0.5}'


def test_overwrite_removes_the_earlier_run_first(tmp_path):
    argv = [*DIGITS, *FAST, "--out", str(tmp_path / "o")]
    out = _config_only_run(tmp_path, argv)
    (out / "results.json").write_text("{}")
    (out / "metrics.csv").write_text("phase,epoch\nretrain,1\n")
    (out / "checkpoints" / "train-retrain" / "1").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    harness.start(cifar100_oneshot.parse_args([*argv, "--overwrite", "--sparsity", "0.9"]))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "notes.txt"]
    assert json.loads((out / "config.json").read_text())["sparsity"] == 0.9


def test_finished_results_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--dataset", "digits", "--model", "small_cnn", "--out", str(out), *FAST])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.parametrize("module", [pretrain, cifar100_oneshot, imagenet_iterative])
def test_help_documents_the_common_flags(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--dataset", "--model", "--pruner", "--sparsity", "--steps",
                 "--particles", "--prune-batch-size", "--batch-size", "--pretrain-epochs",
                 "--epochs", "--seed", "--out", "--smoke"):
        assert flag in text


def test_structured_oneshot_prunes_channels(tmp_path):
    out = tmp_path / "struct"
    assert cifar100_oneshot.main(["--dataset", "digits", "--model", "small_cnn", "--pretrain-epochs",
                                  "1", "--mask-dim", "out", "--scope", "local", "--sparsity", "0.75",
                                  "--out", str(out), *FAST]) == 0
    results = _results(out)
    assert results["sparsity_per_layer"]["Conv_1/kernel"] == pytest.approx(0.5)
    assert 0.4 < results["achieved_sparsity"] < 0.8


def test_structured_needs_local_scope(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--dataset", "digits", "--mask-dim", "out", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "scope" in capsys.readouterr().err


def test_a_second_process_on_the_same_out_is_refused(tmp_path, capsys):
    """E.g. a job submitted twice: the second must not write into the first's folder."""
    argv = [*DIGITS, *FAST, "--out", str(tmp_path / "o")]
    out = _config_only_run(tmp_path, argv)
    rundir.release_locks()  # this process made the run; now another one holds it
    with subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments.harness import rundir; "
         "rundir.lock_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(out)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            for extra in (["--resume"], ["--overwrite"]):
                with pytest.raises(SystemExit) as exc:
                    cifar100_oneshot.main([*argv, *extra])
                assert exc.value.code == 2
                err = capsys.readouterr().err
                assert err.count("\n") == 1 and "another process is running" in err
            assert (out / "config.json").exists()
        finally:
            holder.kill()
