"""What a run shows and records, checked without running one: flags, plots, logs, checks.

* ``--smoke`` fills in small sizes and the embedded digits and never
  overrides a flag that is given; a given flag that leaves it no dense model
  to train is a one-line error.
* ``--help`` of every experiment gives every option a help text and its default.
* Path flags expand ``~`` and environment variables.
* A dense checkpoint of another model stops the run before anything is
  written, in one line without arrays.
* ``--resume`` ignores config.json's ``environment`` (versions, machine).
* The plots carry titles and labels, draw the dense accuracy as a band, the
  SFPK targets and particle spread, integer epochs and the pruning moment.
* Without bars, SFPK logs one line every 10 steps; the bar names its run.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection

import sfpk_jax
from benchmarks import compare_pruners
from experiments import cifar100_oneshot, demo, harness, imagenet_iterative, pretrain
from experiments.harness import environment, progress
from sfpk_jax.models import build
from sfpk_jax.storage import checkpoint_files as checkpoints
from sfpk_jax.tools import plots

EXPERIMENTS = {"pretrain": pretrain, "cifar100_oneshot": cifar100_oneshot,
               "imagenet_iterative": imagenet_iterative, "demo": demo,
               "compare_pruners": compare_pruners}


def _one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --smoke ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pretrain", "cifar100_oneshot", "imagenet_iterative",
                                  "compare_pruners"])
def test_smoke_alone_chooses_the_digits_and_small_sizes(tmp_path, name):
    args = EXPERIMENTS[name].parse_args(["--smoke", "--out", str(tmp_path / "o")])
    assert (args.dataset, args.model) == ("digits", "small_cnn")
    assert (args.steps, args.particles, args.batch_size, args.epochs) == (3, 2, 32, 2)
    # A pruning experiment trains its dense model itself (1 epoch): none is given.
    assert args.pretrain_epochs == (0 if name == "pretrain" else 1)


def test_smoke_keeps_what_is_given(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = cifar100_oneshot.parse_args(["--smoke", "--data-dir", str(data), "--epochs", "1",
                                        "--model", "resnet20", "--out", str(tmp_path / "o")])
    assert (args.dataset, args.model, args.epochs) == ("cifar100", "resnet20", 1)
    args = compare_pruners.parse_args(["--smoke", "--seeds", "3,4", "--out", str(tmp_path / "o")])
    assert args.seeds == [3, 4] and args.sparsities == [0.9]
    args = demo.parse_args(["--smoke", "--particles", "1", "--out", str(tmp_path / "o")])
    assert (args.particles, args.steps, args.sparsities) == (1, 3, [0.9])


@pytest.mark.parametrize("name, flags, kept", [
    ("cifar100_oneshot", ["--epochs", "5", "--particles", "4"], {"epochs": 5, "particles": 4}),
    ("cifar100_oneshot", ["--pretrain-epochs", "2"], {"pretrain_epochs": 2}),
    ("imagenet_iterative", ["--rounds", "4"], {"rounds": 4, "round_epochs": 1}),
    ("demo", ["--steps", "100"], {"steps": 100, "particles": 2}),
])
def test_smoke_never_overrides_a_given_flag(tmp_path, name, flags, kept):
    args = EXPERIMENTS[name].parse_args(["--smoke", *flags, "--out", str(tmp_path / "o")])
    assert {k: getattr(args, k) for k in kept} == kept


def test_smoke_without_a_dense_model_to_train_is_an_error(tmp_path, capsys):
    out = tmp_path / "o"
    err = _one_line_error(capsys, lambda: cifar100_oneshot.parse_args(
        ["--smoke", "--pretrain-epochs", "0", "--out", str(out)]))
    assert "--pretrain-epochs=0" in err and "--smoke" in err and "--dense-checkpoint" in err
    assert not out.exists()


# --help ------------------------------------------------------------------------------------


def _options(text: str) -> dict[str, str]:
    """Option invocation -> its help text, read from argparse's ``--help`` output."""
    options, current = {}, None
    for line in text.splitlines():
        start = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if start:
            current = start.group(1)
            options[current] = start.group(2) or ""
        elif current and line.startswith("    ") and line.strip():
            options[current] += " " + line.strip()
        else:
            current = None
    return options


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_help_gives_every_option_a_text_and_its_default(capsys, name):
    with pytest.raises(SystemExit) as exc:
        EXPERIMENTS[name].main(["--help"])
    assert exc.value.code == 0
    options = _options(capsys.readouterr().out)
    assert len(options) > 10 and "--out OUT" in options
    for invocation, text in options.items():
        if invocation.startswith("-h"):
            continue
        assert text.strip() and "(default:" in text, (invocation, text)
        assert text.split("(default:")[0].strip(), f"{invocation} has no help text"


# Paths -------------------------------------------------------------------------------------


def test_path_flags_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SFPK_RUNS", str(tmp_path / "runs"))
    (tmp_path / "data").mkdir()
    args = cifar100_oneshot.parse_args(["--smoke", "--data-dir", "~/data", "--out",
                                        "$SFPK_RUNS/one"])
    assert args.data_dir == str(tmp_path / "data") and args.out == str(tmp_path / "runs" / "one")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    args = imagenet_iterative.parse_args(["--smoke", "--pretrained-weights", "~/w.safetensors",
                                          "--out", "~/it"])
    assert args.pretrained_weights == str(weights) and args.out == str(tmp_path / "it")


# Dense checkpoints, checked before any write -------------------------------------------------


def _variables(num_classes: int) -> dict:
    return build("small_cnn", num_classes=num_classes, key=jax.random.key(0),
                 input_shape=(1, 8, 8, 1))[1]


@pytest.mark.parametrize("kind", ["classes", "structure", "not_a_checkpoint"])
def test_a_wrong_dense_checkpoint_stops_before_any_write(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setenv("HOME", str(tmp_path))
    ckpt = tmp_path / "ckpt"
    if kind == "classes":  # the checkpoint of a 100-class model for the 10 digits
        checkpoints.save(ckpt, _variables(100))
        shown = "params/Dense_0/kernel (64, 100) (the model: (64, 10))"
    elif kind == "structure":  # a run's final checkpoint: variables and masks
        checkpoints.save(ckpt, {"variables": _variables(10), "masks": _variables(10)["params"]})
        shown = "missing batch_stats/BatchNorm_0/mean"
    else:
        ckpt.mkdir()
        shown = "no orbax checkpoint"
    out = tmp_path / "run"
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        ["--smoke", "--no-progress", "--dense-checkpoint", "~/ckpt", "--out", str(out)]))
    assert f"--dense-checkpoint={str(ckpt)!r} is not allowed" in err and shown in err, err
    assert "Array(" not in err and "Traceback" not in err and len(err) < 1000
    assert not out.exists()  # so the same --out is a fresh run, not "an interrupted run"


# config.json's environment ------------------------------------------------------------------


def test_config_records_the_environment_and_resume_ignores_it(tmp_path, capsys):
    argv = ["--smoke", "--no-progress", "--out", str(tmp_path / "o")]
    out = harness.start(cifar100_oneshot.parse_args(argv))
    config = json.loads((out / "config.json").read_text())
    env = config[environment.KEY]
    for key in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "backend",
                "devices", "cpu", "git_commit"):
        assert key in env
    assert env["backend"] == jax.default_backend() and env["devices"]
    # Resumed with other versions or on another machine: the flags still match.
    config[environment.KEY] = {"jax": "0.0.1", "cpu": "elsewhere"}
    (out / "config.json").write_text(json.dumps(config))
    assert harness.start(cifar100_oneshot.parse_args([*argv, "--resume"])) == out
    assert "resuming" in capsys.readouterr().err


def test_summarize_says_what_each_accuracy_is():
    accs = [0.1, 0.5, 0.4, 0.3, 0.2, 0.6, 0.45]
    assert harness.summarize(accs) == {"final_acc": 0.45, "mean_last5_acc": pytest.approx(0.39),
                                       "best_acc": 0.6}


# Plots -------------------------------------------------------------------------------------


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_accuracy_vs_sparsity_draws_the_dense_model_as_a_band(tmp_path):
    records = [{"pruner": p, "sparsity": s, "acc_pruned": a - 0.1, "acc_retrained": a}
               for p in ("sfpk", "magnitude") for s, a in ((0.9, 0.99), (0.95, 0.985))]
    fig = plots.accuracy_vs_sparsity(records, str(tmp_path / "a.png"), 0.996, title="small_cnn "
                                     "on digits")
    ax = fig.axes[0]
    assert ax.get_title() == "small_cnn on digits"
    assert "sparsity" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["90%", "95%"]
    # No horizontal line at the dense accuracy (it would hide the points there) ...
    assert not [line for line in ax.get_lines() if set(line.get_ydata()) == {0.996}]
    # ... but a band behind the points, named in the legend.
    band = [p for p in ax.patches if p.get_zorder() < 1]
    assert len(band) == 1
    assert any(t.startswith("dense model: 0.996") for t in _legend(ax))
    assert {"sfpk, retrained", "magnitude, right after pruning"} <= set(_legend(ax))
    assert (tmp_path / "a.png").stat().st_size > 0


def test_sfpk_trace_draws_targets_and_the_particles_spread(tmp_path):
    steps, particles = 12, 5
    rng = np.random.default_rng(0)
    traces = {f"{100 * s:g}% sparsity": {
        "G": np.geomspace(1, 1 - s, steps)[:, None] * (1 + 0.01 * rng.random((1, particles))),
        "E": rng.random((steps, particles))} for s in (0.9, 0.98)}
    targets = {"90% sparsity": 0.1, "98% sparsity": 0.02}
    fig = plots.sfpk_trace(traces, str(tmp_path / "t.png"), targets=targets, title="resnet20")
    ax_g, ax_e = fig.axes
    assert fig._suptitle.get_text() == "resnet20"
    assert "G(m)" in ax_g.get_ylabel() and "density" in ax_g.get_ylabel()
    assert "binarised mask" in ax_e.get_ylabel() and "polarized energy" in ax_e.get_ylabel()
    for ax in (ax_g, ax_e):
        assert ax.get_xlabel() == "SFPK step"
        assert all(float(t).is_integer() for t in ax.get_xticks())
        # One min-max band per trace.
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
    dashed = {line.get_ydata()[0] for line in ax_g.get_lines() if line.get_linestyle() == "--"}
    assert dashed == {0.1, 0.02}
    assert "90% sparsity: 5 particles" in _legend(ax_g)
    assert "98% sparsity: target 0.02" in _legend(ax_g)


def _overlaps_axes(fig, ax) -> bool:
    """Whether ``ax``'s legend covers any of the axes' plotting area (as saved)."""
    canvas = FigureCanvasAgg(fig)  # the saved figure was closed: draw it again as it was
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    return legend.overlaps(ax.get_window_extent(renderer))


def test_trace_legends_hide_no_data_even_when_g_rises_above_one(tmp_path):
    # imagenet_iterative --smoke: 3 steps at r = 5.5 take G up to about 7.
    steps, particles = 3, 2
    g = np.array([[1.0, 1.0], [3.5, 3.0], [7.2, 6.5]])
    traces = {"round 1": {"G": g, "E": np.ones((steps, particles))},
              "round 2": {"G": g[::-1] / 2, "E": np.ones((steps, particles))}}
    fig = plots.sfpk_trace(traces, str(tmp_path / "t.png"), targets={"round 1": 0.5})
    for ax in fig.axes:
        assert not _overlaps_axes(fig, ax)
    low, high = fig.axes[0].get_ylim()
    assert low <= 0.5 and high >= 7.2  # every particle's G inside the axes


def test_layer_sparsity_shows_a_layer_at_zero_and_its_legend_covers_nothing(tmp_path):
    fig = plots.layer_sparsity({"Conv_0/kernel": 0.0, "Conv_1/kernel": 1.0, "Dense_0/kernel": 0.5},
                               str(tmp_path / "d.png"), overall=0.6)
    ax = fig.axes[0]
    ticks = [c for c in ax.collections if c.get_label() == "its value"]
    assert len(ticks) == 1 and not ticks[0].get_clip_on()
    np.testing.assert_array_equal(ticks[0].get_offsets(), [[0, 0.0], [1, 1.0], [2, 0.5]])
    low, high = ax.get_ylim()
    assert low <= 0.0 and high > 1.0
    assert not _overlaps_axes(fig, ax)


def test_accuracy_over_epochs_marks_pruning_with_integer_epochs(tmp_path):
    rows = ([{"phase": "pretrain", "epoch": e, "test_acc": 0.5 + e / 100} for e in (1, 2, 3)]
            + [{"phase": "retrain", "epoch": e, "test_acc": 0.4 + e / 100} for e in (1, 2)])
    fig = plots.accuracy_over_epochs(rows, str(tmp_path / "e.png"), pruned_before=["retrain"],
                                     title="vgg16_bn on cifar100: sfpk at 95% sparsity")
    ax = fig.axes[0]
    assert "95% sparsity" in ax.get_title()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert [line.get_xdata()[0] for line in vertical] == [3.5]  # after pretrain's 3 epochs
    assert "pruning" in _legend(ax)


def test_layer_sparsity_has_a_title_and_the_overall_sparsity(tmp_path):
    fig = plots.layer_sparsity({"Conv_0/kernel": 0.5, "Dense_0/kernel": 0.98},
                               str(tmp_path / "d.png"), overall=0.95, title="t")
    ax = fig.axes[0]
    assert ax.get_title() == "t" and "sparsity" in ax.get_ylabel()
    assert "all layers: 0.95" in _legend(ax)


# Logging -----------------------------------------------------------------------------------


def _toy_prune(config, **kwargs):
    params = {"Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 48).reshape(12, 4)}}

    def loss_fn(p, batch):
        return jnp.mean((batch["x"] @ p["Dense_0"]["kernel"]) ** 2)

    def batches():
        rng = np.random.default_rng(0)
        while True:
            yield {"x": rng.normal(size=(config.particles, 8, 12)).astype(np.float32)}

    return sfpk_jax.sfpk_prune(loss_fn, params, batches(), 0.5, config=config, **kwargs)


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress_on", [False, True])
def test_without_bars_sfpk_logs_every_ten_steps(capsys, progress_on):
    # No bar when asked for none, nor when stderr is no terminal (a log file):
    # one line every 10 steps instead, and no carriage returns anywhere.
    progress.configure(argparse.Namespace(no_progress=True))
    config = sfpk_jax.SFPKConfig(steps=25, particles=2, early_stop=False)
    _toy_prune(config, execution=sfpk_jax.Execution(progress=progress_on), desc="SFPK toy")
    captured = capsys.readouterr()
    steps = re.findall(r"SFPK toy: step (\d+)/25, mean G", captured.out)
    assert steps == ["10", "20", "25"], captured.out
    assert "\r" not in captured.out + captured.err


def test_the_sfpk_bar_names_its_run_and_stays(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    config = sfpk_jax.SFPKConfig(steps=5, particles=2, early_stop=False)
    _toy_prune(config, desc="SFPK toy-0.5")
    final = sys.stderr.getvalue().split("\r")[-1]
    assert final.startswith("SFPK toy-0.5") and "5/5" in final and final.endswith("\n")


def test_the_sfpk_bar_is_closed_when_the_run_fails(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    config = sfpk_jax.SFPKConfig(steps=5, particles=2, early_stop=False)

    def two_batches():
        rng = np.random.default_rng(0)
        for _ in range(2):
            yield {"x": rng.normal(size=(2, 8, 12)).astype(np.float32)}

    params = {"Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 48).reshape(12, 4)}}
    with pytest.raises(ValueError, match="batches ran out at step 2"):
        sfpk_jax.sfpk_prune(lambda p, b: jnp.mean((b["x"] @ p["Dense_0"]["kernel"]) ** 2),
                            params, two_batches(), 0.5, config=config, desc="SFPK failing")
    # A closed tqdm bar ends its line; one left open would leave it dangling.
    final = sys.stderr.getvalue().split("\r")[-1]
    assert final.startswith("SFPK failing") and "2/5" in final and final.endswith("\n")
