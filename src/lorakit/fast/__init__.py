"""Speed paths over the frozen-base seam: fused kernels, block fusions, norm remake, reduced
frozen products, the fused loss, the CPU caching allocator. Each can be switched off and is tested
against the plain result of lorakit.lora."""
