"""Metrix at a feature map: what ``metrix-feature`` costs where the map is large.

The small CNN of bench_train_step.py mixes a 1x1 map (metrix-feature ~1.0x there). Here a
ResNet-18 (torchvision, random weights, no download) at 64 px mixes at stage 1..5 (after the stem
16x16x64, layer1 16x16x64, layer2 8x8x128, layer3 4x4x256, layer4 2x2x512; stage 5 is Tango's
default and the official code's place) and each (stage, batch) cell times three training losses on
the same model and the same P x K batch (K = 4 images per class):

* ``none``: contrastive loss on ``model(x)``.
* ``metrix-feature``: Tango's ``MetrixFeature(stage=s)`` around the same loss
  (``dml/mixing/metrix.py``, ``_StagedMetrix._step``): one ``forward_to`` shared by the clean and
  the mixed pass, ONE mixed map per anchor (a random positive x one random negative, deduplicated),
  so the mixed pass holds at most B maps.
* ``official``: the official scheme, transcribed from github.com/billpsomas/metrix (commit
  b679703): ``train.py::feature_metrix_contrastive`` (the ``layer_mix == 0`` positive-negative
  branch; the other branch mixes the anchors without a positive, of which a P x K batch has none),
  ``mixup/utils.py::feature_posneg_pair_mixup_for_pos_anchor`` (the tuples: for every
  anchor-positive pair of ``lmu.get_all_pairs_indices``, every negative of the anchor, with the
  anchor's first positive, so B*(K-1)*(B-K) tuples: 2,688 at batch 32, 47,616 at 128),
  ``net/feature_resnet.py::Resnet50.forward`` (two more backbone passes, ``type='clean_anchor'``
  gathering ``x[a2]`` and ``type='mixed'`` building ``lam * x[pos] + (1 - lam) * x[neg]``, one
  map per tuple, at the mixing point, then pooling and the head) and ``mixup/losses.py::
  loss_posneg_mixup`` (``LpDistance`` of all anchor embeddings to all mixed embeddings, a T x T
  matrix of which the diagonal is used, with pml's AvgNonZero reducers). With one lambda per
  batch and the first positive repeated for each of an anchor's K-1 positive pairs, many of the T
  mixed maps are identical (448 distinct (positive, negative) mixes of 2,688 at batch 32); the
  output counts them. BatchNorm is in training mode for all three losses (the official code
  freezes it by default, which changes little of the cost). The official code mixes
  after layer4 (stage 5 here); at stages 1-4 the same forward runs with its two mixing lines
  moved to that stage (``--official-anchors clean`` takes the anchors' embeddings from the clean
  pass instead of gathering their maps, a cheaper reading than the code's).

A step is forward + loss + backward (no optimizer). Time: on a CPU the process CPU time of the
step with one torch thread (other processes on a shared machine do not inflate it, as in
bench_train_step.py), on CUDA wall time; median of ``--repeats`` timed steps (``--official-repeats``
for the official scheme, whose steps take seconds to tens of seconds) after one memory step and
``--warmup`` untimed ones, the losses interleaved.
Memory, one extra step per loss: the bytes of the tensors autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``, once per storage, parameters excluded: the
activation memory a step holds when backward starts); on CUDA also the peak allocation of the
step. The official scheme's saved memory is also predicted from its count of maps T: probe steps
with 32 and 64 tuples give fixed bytes + bytes per tuple x T, and the distance and loss alone on
512-2,048 random embeddings the T x T part (predicted and measured agree to the MiB where both
exist). A cell whose predicted peak (saved bytes + twice the T x T matrix, its gradient and a
temporary of backward) exceeds ``--mem-limit-gib`` is not run; its memory is shown as predicted.

Needs pytorch-metric-learning (a test dependency of Tango), as the official code does.

    python benchmarks/bench_metrix_feature.py                 # stages 1-5, batches 32 and 128
    python benchmarks/bench_metrix_feature.py --quick         # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench_train_step import hooked_saved_bytes   # noqa: E402 (benchmarks/ on sys.path)

MIB, GIB = 2**20, 2**30


# --------------------------------------------------------------------------- the official scheme

def official_tuples(target: torch.Tensor):
    """The tuples of the official feature mode, a plain transcription of
    ``lmu.get_all_pairs_indices`` + ``mixup/utils.py::feature_posneg_pair_mixup_for_pos_anchor``
    (billpsomas/metrix): for every anchor-positive pair (a1[i], pos[i]) every negative of that
    anchor, mixed with the anchor's *first* positive. Returns (a2, pos, neg) of length T."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    a1, pos, a2, neg = lmu.get_all_pairs_indices(target)
    new_anc, new_neg, new_pos = [], [], []
    for anchor_pos in a1:
        idxs = torch.where(anchor_pos == a2)[0]
        new_neg.append(neg[idxs].cpu().numpy())
        new_anc.append(a2[idxs].cpu().numpy())
        index_pos = torch.where(anchor_pos == a1)[0]
        new_pos.append([pos[index_pos].cpu().numpy()[0]] * len(idxs))
    a2 = list(itertools.chain.from_iterable(new_anc))
    neg = list(itertools.chain.from_iterable(new_neg))
    pos = list(itertools.chain.from_iterable(new_pos))
    return (torch.from_numpy(np.array(a2)), torch.from_numpy(np.array(pos)),
            torch.from_numpy(np.array(neg)))


class Official:
    """``train.py::feature_metrix_contrastive`` (positive-negative branch) on a staged model,
    mixing after ``stage`` stages. ``anchors="map"``: as ``net/feature_resnet.py::Resnet50.forward``
    with ``type='clean_anchor'`` (a backbone pass, the anchors' maps gathered per tuple at the
    mixing point, then the rest of the network); ``"clean"``: the anchors' embeddings gathered from
    the clean pass. ``max_tuples``: keep only the first tuples (the memory probe)."""

    def __init__(self, stage: int, anchors: str = "map", alpha: float = 2.0):
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.losses import ContrastiveLoss
        from pytorch_metric_learning.reducers import AvgNonZeroReducer, MultipleReducers

        self.stage, self.anchors, self.alpha = stage, anchors, alpha
        self.criterion = ContrastiveLoss(neg_margin=0.5)        # main.py, loss 'contrastive'
        self.distance = LpDistance()
        self.reducer_pos = MultipleReducers({"pos_loss": AvgNonZeroReducer()})
        self.reducer_neg = MultipleReducers({"neg_loss": AvgNonZeroReducer()})
        self.max_tuples: int | None = None
        self.num_tuples = 0

    def _forward(self, model, x, a2, pos, neg, lam, type_):
        """net/feature_resnet.py::Resnet50.forward, mode 'pos_neg_mixup', mixing at ``stage``."""
        h = model.forward_to(x, self.stage)
        if type_ == "clean_anchor":
            h = h[a2.long()]
        elif type_ == "mixed":
            h = lam * h[pos.long()] + (1 - lam) * h[neg.long()]      # mixup_data(p, n, lam)
        return model.forward_from(h, self.stage)

    def __call__(self, model, x, target):
        out_clean = model(x)                                          # mode='clean'
        loss_clean = self.criterion(out_clean, target)
        lam = float(np.random.beta(self.alpha, self.alpha))
        a2, pos, neg = official_tuples(target.cpu())
        if self.max_tuples is not None:
            a2, pos, neg = a2[:self.max_tuples], pos[:self.max_tuples], neg[:self.max_tuples]
        self.num_tuples = len(a2)
        a2, pos, neg = a2.to(x.device), pos.to(x.device), neg.to(x.device)
        y_pos, y_neg = target[pos.long()], target[neg.long()]
        if self.anchors == "map":
            anchor_embedding = self._forward(model, x, a2, pos, neg, lam, "clean_anchor")
        else:
            anchor_embedding = out_clean[a2.long()]
        mixed_embedding = self._forward(model, x, a2, pos, neg, lam, "mixed")
        return loss_clean + 0.4 * self.mixed_loss(anchor_embedding, mixed_embedding, a2, pos,
                                                  neg, y_pos, y_neg, lam)

    def mixed_loss(self, anchor_embedding, mixed_embedding, a2, pos, neg, y_pos, y_neg, lam):
        """``sim_mix = distance(anchor, mixed)`` (T x T) and mixup/losses.py::loss_posneg_mixup
        on its diagonal, reduced as train.py does."""
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        sim_mix = self.distance(anchor_embedding, mixed_embedding)    # (T, T), LpDistance
        pair_dist = torch.diagonal(sim_mix, 0)
        indices_tuple = (a2, pos, a2, neg)
        pos_loss = lam * torch.relu(pair_dist - 0.0)
        neg_loss = (1 - lam) * torch.relu(0.5 - pair_dist)
        loss_pos = {"pos_loss": {"losses": pos_loss, "indices": lmu.pos_pairs_from_tuple(
            indices_tuple), "reduction_type": "pos_pair"}}
        loss_neg = {"neg_loss": {"losses": neg_loss, "indices": lmu.neg_pairs_from_tuple(
            indices_tuple), "reduction_type": "neg_pair"}}
        return (self.reducer_pos(loss_pos, sim_mix, y_pos)
                + self.reducer_neg(loss_neg, sim_mix, y_neg))


def official_map_count(batch: int, per_class: int) -> int:
    """T = B (K-1) (B-K): anchor-positive pairs x negatives of the anchor."""
    return batch * (per_class - 1) * (batch - per_class)


# --------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(loss_call, model) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of forward + loss + backward."""
    sync(model.head.weight.device)
    t0, c0 = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    loss_call().backward()
    sync(model.head.weight.device)
    return time.perf_counter() - t0, time.process_time() - c0


def saved_bytes(loss_call, model) -> tuple[float, float]:
    """(bytes saved for backward, parameters excluded; peak CUDA bytes of the step or nan)."""
    device = model.head.weight.device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    peak = float("nan")
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    out = []
    saved = hooked_saved_bytes(lambda: out.append(loss_call()), params)
    out.pop().backward()
    if device.type == "cuda":
        sync(device)
        peak = float(torch.cuda.max_memory_allocated(device) - before)
    model.zero_grad(set_to_none=True)
    return saved, peak


def predict_official(official: Official, model, x, y, tuples: int, dim: int) -> float:
    """Saved bytes of the official step with ``tuples`` maps T: the network part, linear in T
    (fixed + bytes per tuple, from probe steps with 32 and 64 tuples), plus the distance part,
    quadratic in T (the T x T matrix; fitted on the distance and loss alone with 512, 1024 and
    2048 random embeddings, where the T^2 term dominates, and taken out of the probes)."""
    sizes = np.array([512.0, 1024.0, 2048.0])
    got = []
    for n in sizes.astype(int):
        e = torch.randn(2, n, dim, device=x.device, requires_grad=True)
        idx = torch.arange(n, device=x.device)
        yy = torch.zeros(n, dtype=torch.long, device=x.device)
        got.append(hooked_saved_bytes(
            lambda: official.mixed_loss(e[0] * 1, e[1] * 1, idx, idx, idx, yy, yy, 0.5)))
    dist = np.polyfit(sizes, np.array(got), 2)
    probes, net = (32, 64), []
    for n in probes:
        official.max_tuples = n
        net.append(saved_bytes(lambda: official(model, x, y), model)[0] - np.polyval(dist, n))
    official.max_tuples = None
    per = (net[1] - net[0]) / (probes[1] - probes[0])
    fixed = net[0] - per * probes[0]
    return float(fixed + per * tuples + np.polyval(dist, float(tuples)))


def measure_cell(stage: int, batch: int, args, device) -> dict:
    from dml.losses import build_loss
    from dml.mixing import build_mixing
    from dml.models import build_model

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = build_model("resnet18", 3, args.image_size, args.embedding_dim,
                        pool="avgmax").to(device)
    model.train()
    if not 1 <= stage <= model.num_stages:
        raise SystemExit(f"stage must be in 1..{model.num_stages}, got {stage}")
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    y = torch.arange(batch // args.per_class, device=device).repeat_interleave(args.per_class)
    loss_fn = build_loss("contrastive").to(device)
    tango = build_mixing("metrix-feature", loss_fn, stage=stage)
    official = Official(stage, args.official_anchors)
    calls = {"none": lambda: loss_fn(model(x), y),
             "metrix-feature": lambda: tango(model, x, y),
             "official": lambda: official(model, x, y)}
    model.eval()
    with torch.no_grad():
        map_shape = tuple(model.forward_to(x[:1], stage).shape[1:])
    model.train()
    tuples = official_map_count(batch, args.per_class)
    syn = tango.synthesize(model, None, x, y)
    cell = {"stage": stage, "stage_name": model.stage_names[stage - 1], "batch": batch,
            "map": map_shape, "tango_maps": len(syn),
            "official_maps": tuples, "times": {k: [] for k in calls},
            "cpu_times": {k: [] for k in calls}, "saved": {}, "peak": {},
            "official_run": True}
    predicted = predict_official(official, model, x, y, tuples, args.embedding_dim)
    cell["official_predicted"] = predicted
    # at the peak of backward the T x T matrix's gradient and one temporary as large come on top
    cell["official_peak_estimate"] = predicted + 2 * x.element_size() * float(tuples) ** 2
    if cell["official_peak_estimate"] > args.mem_limit_gib * GIB:
        cell["official_run"] = False
        del calls["official"]
    for name, call in calls.items():            # the memory step is also the first warm-up
        cell["saved"][name], cell["peak"][name] = saved_bytes(call, model)
    if cell["official_run"]:
        assert official.num_tuples == tuples, (official.num_tuples, tuples)
    order = list(calls)
    for r in range(args.warmup + args.repeats):
        for name in order:
            if name == "official" and r >= args.warmup + args.official_repeats:
                continue
            dt, dc = step(calls[name], model)
            if r >= args.warmup:
                cell["times"][name].append(dt)
                cell["cpu_times"][name].append(dc)
        order = order[1:] + order[:1]           # rotate: no loss always runs first
    return cell


# --------------------------------------------------------------------------- report

def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def table(cells: list[dict], device: torch.device) -> str:
    on_cuda = device.type == "cuda"
    mem = "peak CUDA MiB" if on_cuda else "saved MiB"
    head = (f"| stage (after, map) | batch | maps mixed: Tango / official | none ms | "
            f"metrix-feature ms (x none) | official ms (x none) | none {mem} | "
            f"metrix-feature {mem} (x none) | official {mem} (x none) | "
            f"Tango vs official: faster | less memory |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        times = c["times"] if on_cuda else c["cpu_times"]     # CPU: process CPU time
        med = {k: statistics.median(v) * 1000 for k, v in times.items() if v}
        m = c["peak"] if on_cuda else c["saved"]
        shape = "x".join(str(d) for d in c["map"][1:]) + "x" + str(c["map"][0])
        n, t = med["none"], med["metrix-feature"]
        mn, mt = m["none"], m["metrix-feature"]
        row = [f"{c['stage']} ({c['stage_name']}, {shape})", str(c["batch"]),
               f"{c['tango_maps']} / {c['official_maps']:,}", f"{n:.0f}",
               f"{t:.0f} ({fmt_ratio(t, n)})"]
        if c["official_run"]:
            o, mo = med["official"], m["official"]
            row += [f"{o:,.0f} ({fmt_ratio(o, n)})", f"{mn / MIB:.0f}",
                    f"{mt / MIB:.0f} ({fmt_ratio(mt, mn)})",
                    f"{mo / MIB:,.0f} ({fmt_ratio(mo, mn)})",
                    f"{fmt_ratio(o, t)}x", f"{fmt_ratio(mo, mt)}x"]
        else:
            po = c["official_predicted"]
            row += ["not run", f"{mn / MIB:.0f}", f"{mt / MIB:.0f} ({fmt_ratio(mt, mn)})",
                    f"~{po / MIB:,.0f} predicted ({fmt_ratio(po, mn)})", "-",
                    f"~{fmt_ratio(po, mt)}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python benchmarks/bench_metrix_feature.py", *args])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batches", default="32,128", help="comma-separated batch sizes (P x K)")
    ap.add_argument("--per-class", type=int, default=4, help="K, images per class")
    ap.add_argument("--stages", default="1,2,3,4,5",
                    help="comma-separated mixing stages (1 = after the stem .. 5 = after layer4)")
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed steps of none and metrix-feature (median)")
    ap.add_argument("--official-repeats", type=int, default=1,
                    help="timed steps of the official scheme (median; one such step takes "
                         "up to ~45 s on one CPU thread at stage 1, batch 32)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed steps per loss after the memory step (which warms up too)")
    ap.add_argument("--official-anchors", choices=("map", "clean"), default="map",
                    help="map: as the official forward (anchors' maps gathered per tuple); "
                         "clean: anchors' embeddings from the clean pass")
    ap.add_argument("--mem-limit-gib", type=float, default=12.0,
                    help="do not run an official cell whose predicted peak memory (GiB) "
                         "exceeds this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: per-step CPU time is then a stable "
                         "measure on a shared machine; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 32 px, batch 8, stages 3 and 5, 16-d, one timed step "
                         "(sizes given on the command line are kept)")
    args = ap.parse_args(argv)
    if args.quick:                              # the sizes not given on the command line
        quick = {"image_size": 32, "batches": "8", "stages": "3,5", "repeats": 1,
                 "official_repeats": 1, "warmup": 0, "embedding_dim": 16}
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    for b in batches:
        if b % args.per_class or b // args.per_class < 2:
            raise SystemExit(f"batch {b} must be a multiple of --per-class {args.per_class} "
                             f"with at least 2 classes")

    t_start = time.perf_counter()
    cells = []
    for stage in stages:
        for batch in batches:
            cells.append(measure_cell(stage, batch, args, device))
            print(f"stage {stage} batch {batch} done ({time.perf_counter() - t_start:.0f} s)",
                  file=sys.stderr, flush=True)

    on_cpu = device.type != "cuda"
    dev = (f"CPU, {torch.get_num_threads()} thread(s)" if on_cpu
           else torch.cuda.get_device_name(device))
    print(f"\nMetrix at a feature map: resnet18 (random weights, avgmax pool, "
          f"{args.embedding_dim}-d), {args.image_size} px, P x {args.per_class} batches, "
          f"contrastive loss; {dev}; torch {torch.__version__}, {platform.machine()}, "
          f"Python {platform.python_version()}.")
    print(f"Step = forward + loss + backward; "
          f"{'process CPU' if on_cpu else 'wall'} ms, median of {args.repeats} timed step(s) "
          f"({args.official_repeats} for official) "
          f"after the memory step{f' and {args.warmup} warm-up' if args.warmup else ''}. "
          + ("Memory: bytes autograd saves for backward (activations), once per storage, "
             "parameters excluded." if on_cpu else
             "Memory: peak CUDA allocation of the step minus what was allocated before."))
    print(f"Official anchors: {args.official_anchors} "
          + ("(the official forward: every tuple's anchor map gathered and run through the rest "
             "of the network)." if args.official_anchors == "map" else
             "(anchors' embeddings from the clean pass)."))
    print()
    print(table(cells, device))
    print()
    for c in cells:
        if not c["official_run"]:
            t2 = c["official_maps"] ** 2 * 4 / GIB
            print(f"Note: stage {c['stage']}, batch {c['batch']}: official not run: predicted "
                  f"{c['official_predicted'] / GIB:.1f} GiB saved for backward, "
                  f"~{c['official_peak_estimate'] / GIB:.1f} GiB at the peak (+ 2 x the "
                  f"{t2:.1f} GiB T x T matrix) > --mem-limit-gib {args.mem_limit_gib:g}; "
                  f"T = {c['official_maps']:,} tuples.")
        else:
            print(f"Check: stage {c['stage']}, batch {c['batch']}: official saved "
                  f"{c['saved']['official'] / GIB:.2f} GiB measured, "
                  f"{c['official_predicted'] / GIB:.2f} GiB predicted from the probes.")
    for batch in batches:
        y = torch.arange(batch // args.per_class).repeat_interleave(args.per_class)
        _, pos, neg = official_tuples(y)
        distinct = len(torch.unique(torch.stack([pos, neg], 1), dim=0))
        print(f"Official tuples at batch {batch}: {len(pos):,} mixed maps forwarded, "
              f"{distinct:,} distinct (positive, negative) mixes among them.")
    print(f"\nCommand: `{command_line(argv)}` ({(time.perf_counter() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
