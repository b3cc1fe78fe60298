"""The speed benchmark scripts run and report what they claim to (numbers are not asserted:
speed belongs in the benchmarks, not in the tests)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _args():
    return argparse.Namespace(dataset="digits", root=None, classes=4, per_class=4,
                              model="small-cnn", width=8, embedding_dim=16, threads=1, seed=0)


def test_trainer_timing_counts_exactly_the_timed_steps():
    import bench_throughput

    args = _args()
    cfg = bench_throughput.base_config(args)
    walls, cpus = bench_throughput.time_trainer(cfg, steps=3, warmup=2)
    assert len(walls) == len(cpus) == 3
    assert all(w > 0 for w in walls) and all(c >= 0 for c in cpus)
    walls, cpus, batch = bench_throughput.time_bare(cfg, steps=2, warmup=1)
    assert len(walls) == 2 and batch == 16


@pytest.mark.slow
def test_bench_speed_writes_one_block_per_part(tmp_path):
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\nprose kept\n")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_speed.py"), "--quick", "--parts",
                           "throughput", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "prose kept" in text
    block = text.split("<!-- tango:speed-throughput:begin -->")[1].split(
        "<!-- tango:speed-throughput:end -->")[0]
    assert "python benchmarks/bench_throughput.py --dataset digits" in block
    rows = [r for r in block.splitlines() if r.startswith("| ") and "ms" not in r]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[0].startswith("bare forward+backward")
    assert "trainer: multi-similarity / none" in names
    assert rows[0].split("|")[5].strip() == "1.00"     # bare relative to itself


def test_bench_speed_rejects_an_unknown_part():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_speed.py"), "--parts", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part" in proc.stderr


def test_bench_metrix_feature_quick_table_and_official_count(capsys):
    import bench_metrix_feature as bmf

    y = torch.arange(8).repeat_interleave(4)               # the official default: batch 32, K=4
    a2, pos, neg = bmf.official_tuples(y)
    assert len(a2) == bmf.official_map_count(32, 4) == 2688
    assert bool((y[a2] == y[pos]).all()) and bool((y[a2] != y[neg]).all())
    threads = torch.get_num_threads()
    try:
        bmf.main(["--quick"])
        out = capsys.readouterr().out
        bmf.main(["--quick", "--stages", "5", "--mem-limit-gib", "0"])   # predicted, not run
    finally:
        torch.set_num_threads(threads)          # main() sets one thread
    rows = [r for r in out.splitlines() if r.startswith("| ") and "batch" not in r]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["3", "5"]
    assert all(r.split("|")[3].strip() == "7 / 96" for r in rows)   # Tango / official maps
    assert out.count("Check: stage") == 2
    assert "Command: `python benchmarks/bench_metrix_feature.py --quick`" in out
    out = capsys.readouterr().out
    assert "not run" in out and "predicted" in out and "Note: stage 5, batch 8" in out


def test_bench_gpu_quick_trains_each_cell_and_reports_speed(capsys):
    import bench_gpu

    threads = torch.get_num_threads()
    try:
        bench_gpu.main(["--quick", "--precisions", "fp32", "bf16", "--mixings", "none",
                        "proxy-synthesis"])
    finally:
        torch.set_num_threads(threads)
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines()
            if r.startswith("| ") and "images/s" not in r]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [
        ("none", "fp32"), ("none", "bf16"), ("proxy-synthesis", "fp32"),
        ("proxy-synthesis", "bf16")]
    assert all(float(r[3]) > 0 and 0 <= float(r[5].strip(" %")) <= 100 for r in rows)


def test_bench_data_path_quick_runs():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_data_path.py"), "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "workers=1" in proc.stdout and "old" in proc.stdout


@pytest.mark.slow
def test_bench_maps_off_path_reports_both_modes_with_their_maps():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_maps_off_path.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| digits")]
    assert [r.split("|")[2].strip() for r in rows] == ["background", "inline"]
    for r in rows:
        returned, maps_at = float(r.split("|")[3]), float(r.split("|")[4])
        assert maps_at >= returned > 0 if "background" in r else maps_at == returned
        assert "epoch_0001.pca.npz" in r
