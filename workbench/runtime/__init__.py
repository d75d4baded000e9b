"""Runtime: KV cache, sampler, tokenizers, checkpoints, the generate loop, tensor parallelism."""
