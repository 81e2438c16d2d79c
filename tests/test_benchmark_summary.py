"""benchmarks/summary.py on hand-made pytest-benchmark records: every op record is grouped
with its baseline, the fused-vs-eager records of both forms are tabulated, and the header
names the CPU even though an op case's own ``device`` field says only "cpu"."""
from benchmarks import summary

CPU_NAME = "Some CPU (2 cores, 2 threads)"
ENV = dict(torch="2.14.1", triton="3.8.0", commit="abc1234", date="2026-12-06 20:52 UTC")


def _op(backend, median, peak=None):
    return {"stats": {"median": median},
            "extra_info": dict(ENV, kind="op", op="patch_nce", mode="fwd+bwd", shape="paper", dtype="fp32",
                               backend=backend, device="cpu", peak_extra_bytes=peak)}


def _fused(kind, op, threads, eager_s, fused_s):
    return {"stats": {"median": fused_s},
            "extra_info": dict(ENV, kind=kind, op=op, shape="paper", groups=8, threads=threads, device=CPU_NAME,
                               eager_median_s=eager_s, fused_median_s=fused_s, speedup=eager_s / fused_s,
                               target=1.5)}


def test_summary_groups_every_op_record_and_both_fused_forms():
    records = [_op("ext", 0.009, 34e6), _op("reference", 0.020, 42e6), _op("reference-compile", 0.025),
               _fused("map-vs-eager", "patch_nce", 1, 0.040, 0.020),
               _fused("rows-vs-eager", "patch_nce_rows", 2, 0.003, 0.002)]
    result = summary.summarise(records)
    by_backend = {row["backend"]: row for row in result["rows"]}
    assert sorted(by_backend) == ["ext", "reference", "reference-compile"]
    assert abs(by_backend["ext"]["speedup_vs_eager"] - 0.020 / 0.009) < 1e-12
    assert abs(by_backend["ext"]["speedup_vs_compile"] - 0.025 / 0.009) < 1e-12
    assert abs(by_backend["ext"]["memory_ratio_vs_eager"] - 34 / 42) < 1e-12
    assert [(r["form"], r["op"], r["threads"]) for r in result["fused_vs_eager"]] == [
        ("map", "patch_nce", 1), ("rows", "patch_nce_rows", 2)]
    assert result["environment"]["device"] == CPU_NAME
    text = summary.to_markdown(result)
    assert text.startswith(f"Device: {CPU_NAME} ·")
    assert "| map | patch_nce | paper | 8 | 1 | 40.00 ms | 20.00 ms | 2.00 | ≥ 1.5 |" in text
    assert "| patch_nce | fwd+bwd | paper | fp32 | ext | 9.00 ms | 2.22 | 2.78 |" in text
