"""The peak fractions are taken of, and the host CPU's bfloat16 instructions."""

from alexnet_jax.benchmarks import peak


def test_cpu_features_from_cpuinfo():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
        "processor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu\n"
    )
    assert peak.cpu_features(cpuinfo) == {
        "model": "Some Xeon",
        "flags": {"avx512f": True, "avx512_bf16": False, "amx_tile": True, "amx_bf16": True},
    }
    assert peak.cpu_features("")["flags"] == dict.fromkeys(peak.CPU_BF16_FLAGS, False)


def test_the_peak_is_the_flag_else_the_datasheet_else_the_measured_matmul():
    assert peak.resolve_peak(2.5, "H200", "bfloat16", 100.0) == (2500.0, "--peak_tflops")
    assert peak.resolve_peak(0.0, "NVIDIA H200", "bfloat16", 100.0) == (
        989_500.0,
        "H200 datasheet, dense bfloat16",
    )
    assert peak.resolve_peak(0.0, "NVIDIA H200", "float32", 100.0, "highest")[1] == (
        "H200 datasheet, dense float32"
    )
    assert peak.resolve_peak(0.0, "cpu", "float32", 100.0) == (100.0, "measured float32 matmul")


def test_the_matmul_peak_is_a_positive_rate():
    assert peak.matmul_peak_gflops(64, steps=1) > 0
