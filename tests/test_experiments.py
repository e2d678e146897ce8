"""Every experiment end to end at --smoke size: outputs, checkpoints, clear failures."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest

from experiments import cifar100_oneshot, imagenet_iterative, pretrain
from sfpk_jax import checkpoints

FAST = ["--smoke", "--no-progress"]
RESULT_KEYS = {"final_acc", "best_acc", "density", "density_per_layer", "mask_digest",
               "prune_seconds", "retrain_seconds"}


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


def test_pretrain_then_oneshot_on_digits(tmp_path):
    dense_out = tmp_path / "dense"
    assert pretrain.main(["--dataset", "digits", "--model", "small_cnn", "--out", str(dense_out),
                          *FAST]) == 0
    ckpt = dense_out / "checkpoints" / "dense"
    assert ckpt.is_dir() and _results(dense_out)["density"] == 1.0
    out = tmp_path / "oneshot"
    assert cifar100_oneshot.main(["--dataset", "digits", "--model", "small_cnn", "--dense-checkpoint",
                                  str(ckpt), "--sparsity", "0.9", "--out", str(out), *FAST]) == 0
    results = _results(out)
    assert RESULT_KEYS <= set(results)
    assert results["density"] == pytest.approx(0.1, abs=1e-3)
    assert len(results["mask_digest"]) == 64
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["retrain", "retrain"]
    assert results["final_acc"] == pytest.approx(np.mean([float(r["test_acc"]) for r in rows]))
    for name in ("accuracy.png", "density_per_layer.png", "sfpk_trace.png", "config.json"):
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
    assert results["density"] == pytest.approx(0.05, abs=1e-3)
    assert (out / "checkpoints" / "dense").is_dir() and (out / "checkpoints" / "pruned").is_dir()
    again = tmp_path / "again"
    assert cifar100_oneshot.main([*argv[:-len(FAST) - 2], "--out", str(again), *FAST]) == 0
    assert _results(again)["mask_digest"] == results["mask_digest"]


def test_iterative_carries_particles_across_rounds(tmp_path):
    out = tmp_path / "it"
    assert imagenet_iterative.main(["--dataset", "digits", "--model", "small_cnn",
                                    "--pretrain-epochs", "1", "--out", str(out), *FAST]) == 0
    results = _results(out)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    first, last = results["rounds"]
    assert first["sparsity"] == pytest.approx(1 - 0.1 ** 0.5)
    assert last["sparsity"] == pytest.approx(0.9)
    assert results["density"] == pytest.approx(0.1, abs=1e-3)


def test_iterative_accumulates_gradients(tmp_path):
    out = tmp_path / "acc"
    assert imagenet_iterative.main(["--dataset", "digits", "--model", "small_cnn", "--pruner",
                                    "magnitude", "--pretrain-epochs", "1", "--accum-steps", "2",
                                    "--out", str(out), *FAST]) == 0
    assert _results(out)["density"] == pytest.approx(0.1, abs=1e-3)


def test_accumulation_must_divide_the_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        imagenet_iterative.main(["--dataset", "digits", "--batch-size", "30", "--accum-steps", "4",
                                 "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--accum-steps" in capsys.readouterr().err


def test_missing_dataset_stops_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--data-dir", str(tmp_path / "nowhere"), "--pretrain-epochs", "1",
                               "--out", str(out), *FAST])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and "Traceback" not in err
    assert not out.exists()


def test_no_dense_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--dataset", "digits", "--model", "small_cnn",
                               "--out", str(tmp_path / "o"), *FAST])
    assert exc.value.code == 2
    assert "--dense-checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--sparsity", "1.5"], "--sparsity"),
    (["--model", "resnet1000"], "--model"),
    (["--pruner", "oracle"], "--pruner"),
    (["--dataset", "mnist"], "--dataset"),
    (["--steps", "0"], "--steps"),
    (["--radius", "0.9"], "--radius"),
    (["--schedule", "cubic"], "--schedule"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--out", str(tmp_path / "o"), *flags])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


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
    assert results["density_per_layer"]["Conv_1/kernel"] == pytest.approx(0.5)
    assert 0.2 < results["density"] < 0.6


def test_structured_needs_local_scope(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cifar100_oneshot.main(["--dataset", "digits", "--mask-dim", "out", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "scope" in capsys.readouterr().err
