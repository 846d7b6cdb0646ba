"""Benchmarks (``python -m peftops bench``): one module per method, registered here."""

# method name -> module defining ``cases(device, dtype, small)``; each slice adds its line.
METHODS = {
    "adapter": "peftops.benchmarks.adapter",
    "dora": "peftops.benchmarks.dora",
    "adapterhub": "peftops.benchmarks.adapterhub",
    "e2e": "peftops.benchmarks.e2e",
    "floors": "peftops.benchmarks.floors",  # the device's HBM copy and GEMM rates (bench/gpu_session.sh)
    "fusion": "peftops.benchmarks.fusion",
    "ia3": "peftops.benchmarks.ia3",
    "lora": "peftops.benchmarks.lora",
    "lora_multi": "peftops.benchmarks.lora_multi",
    "prefix_attention": "peftops.benchmarks.prefix_attention",
    "qlora": "peftops.benchmarks.qlora",
    "unipelt": "peftops.benchmarks.unipelt",
}
