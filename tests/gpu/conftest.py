import torch

# many (kind, window, dtype) variants in one process: let dynamo keep them all compiled
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)
