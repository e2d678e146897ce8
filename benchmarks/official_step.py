"""Times one full step of the official PyTorch SFPK code (reference, not ours).

The official code is not part of this package and is not copied here: it is
imported from a checkout given by ``--official-dir``. Get it with

    git clone https://github.com/mzf666/SFPK-main /tmp/sfpk_official
    # or, from a bare mirror:
    git --git-dir=/work/.mirror/mzf666+SFPK-main/repo archive HEAD | tar -x -C /tmp/sfpk_official

and run it with a PyTorch install (CPU wheels are enough), e.g. in a venv that
still sees the system packages:

    python -m venv --system-site-packages /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch pandas seaborn    # (torch CPU wheel)
    /tmp/torchvenv/bin/python -m benchmarks.official_step \
        --official-dir /tmp/sfpk_official --batch-size 512 --repeats 3

One step is what ``SFPKSystem.simulation`` does per iteration of its loop:
``one_step_evol`` (all n particles: G, polarized E and its gradient, the
repulsion K, the closed-form direction, the move) and ``_update_scores`` (the
vote). The per-step statistics it then writes to CSV files are left out.
Settings are those of ``Scripts/oneshot_sfpk_unstruct_resnet20.sh`` (r=1.4,
lambda=0.2, n=10, soft vote of all particles, ``ohh`` polarizer, l2 sparsity,
exp schedule, momentum 0.1) on ResNet-20 / CIFAR-100 shapes with random data,
the model in training mode (as in ``routine.prune(..., train=True)``).
``transformers`` and ``torchvision`` are stubbed: the SFPK path never uses
them. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import types

from benchmarks.common import PeakRSS


def _stub_modules() -> None:
    """Empty ``transformers`` / ``torchvision`` modules: only their names are used."""

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("transformers", "torchvision", "torchvision.transforms",
                 "torchvision.transforms.functional", "torchvision.datasets"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                sys.modules[name] = _Stub(name)


def build(official_dir: str, num_classes: int, particles: int, batch_size: int, seed: int):
    """The official model, SFPK system and a batch iterator, ready for a step."""
    import torch

    sys.path.insert(0, os.path.abspath(official_dir))
    _stub_modules()
    from Methods.sfpk import MaskSystem, SFPKSystem
    from Methods.utils import free_modules, init_masks_hooks
    from Models.lottery_resnet import resnet20

    torch.manual_seed(seed)
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        model = resnet20((3, 32, 32), num_classes)
        init_masks_hooks(model, False, 1)
        free_modules(model, True, True, True, False, False)
        model.train()
        system = SFPKSystem(
            None, N=100, r=1.4, ode_scope="global", E="CE", G="l2", score_option="mp",
            mask_proc_kwargs={"mask_proc_option": "ohh", "mask_proc_eps": 0.9,
                              "mask_proc_ratio": 0.9, "mask_proc_score_option": "Id",
                              "mask_proc_mxp": True},
            schedule="exp", rt_schedule="fix", momentum=0.1, n_mc=particles, repl=0.2,
            repl_weighted=True, repl_mode="exp", vote_ratio=1.0, vote_mode="soft",
        )
        # The set-up part of SFPKSystem.simulation (no checkpoint, global scope).
        from Methods.utils import masked_params

        for p in model.parameters():
            p.requires_grad = False
        system.model_size = sum(p.numel() for p in model.parameters())
        system.local_prune = False
        system.device = torch.device("cpu")
        system.mask_sys = MaskSystem(particles, model)
        start = system._calc_G(model)[0].item()
        for _, m, _ in masked_params(model):
            m.requires_grad = True

    generator = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(batch_size, 3, 32, 32, generator=generator),
         torch.randint(0, num_classes, (batch_size,), generator=generator))
        for _ in range(particles)
    ]

    class Batches:  # stands in for the official ``inf_iter`` over a loader
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return batches[(self.i - 1) % len(batches)]

    data = Batches()
    target = 0.05

    def step(itr: int) -> None:
        sink = io.StringIO()  # the official code prints timings and a tqdm bar
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            idxs_sort, *_ = system.one_step_evol(itr, start, target, model, data)
            system._update_scores(itr, idxs_sort, model, target_sparsity=target)

    # The bare cost: n forward+backward passes of the plain (unmasked) model.
    plain = resnet20((3, 32, 32), num_classes).train()
    params = list(plain.parameters())

    def bare(itr: int) -> None:
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(plain(x), y)
            torch.autograd.grad(loss, params)

    return step, bare


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", required=True, help="checkout of mzf666/SFPK-main")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    step, bare = build(args.official_dir, args.num_classes, args.particles, args.batch_size,
                       args.seed)
    step(0)  # warm-up
    bare(0)
    times, bare_times, peaks = [], [], []
    for itr in range(1, args.repeats + 1):  # alternate, as benchmarks.sfpk_step does
        for fn, out in ((step, times), (bare, bare_times)):
            with PeakRSS() as peak:
                start = time.perf_counter()
                fn(itr)
                out.append(time.perf_counter() - start)
            if fn is step:
                peaks.append(peak.mb)
    median, bare_median = statistics.median(times), statistics.median(bare_times)
    print(f"official SFPK step, resnet20, n={args.particles}, batch {args.batch_size}: "
          f"median {median:.3f} s ({', '.join(f'{t:.2f}' for t in times)}), bare "
          f"{bare_median:.3f} s, overhead x{median / bare_median:.2f}, peak +{max(peaks):.0f} MB")
    print(json.dumps({
        "impl": "official-pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": "resnet20", "particles": args.particles, "batch_size": args.batch_size,
        "repeats": args.repeats, "step_s_median": median, "step_s": times,
        "bare_s_median": bare_median, "bare_s": bare_times, "overhead": median / bare_median,
        "peak_mb": max(peaks), "backend": "cpu",
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
