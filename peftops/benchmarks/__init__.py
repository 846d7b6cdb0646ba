"""Benchmarks (``python -m peftops bench``): one module per method, registered here."""

# method name -> module defining ``cases(device, dtype, small)``; each slice adds its line.
METHODS = {
    "adapter": "peftops.benchmarks.adapter",
    "adapterhub": "peftops.benchmarks.adapterhub",
    "e2e": "peftops.benchmarks.e2e",
    "fusion": "peftops.benchmarks.fusion",
    "ia3": "peftops.benchmarks.ia3",
    "lora": "peftops.benchmarks.lora",
    "prefix_attention": "peftops.benchmarks.prefix_attention",
    "unipelt": "peftops.benchmarks.unipelt",
}
