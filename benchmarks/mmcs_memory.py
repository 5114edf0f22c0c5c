"""Peak memory of the chunked max-MMCS search on 4096 x 8192 dictionaries (a full float64 cosine matrix would be
256 MiB): the growth of a fresh process's peak resident set, in MiB. Moved here from tests/test_dictionaries.py
(issue 16: no memory or timing bound inside a test)."""

import resource

import torch

from irm.sae.mmcs import mmcs

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
small = torch.randn(4096, 32, generator=g)
large = torch.randn(8192, 32, generator=g)
large[:4096] = small
mmcs(small[:8], large[:8], "max")  # warm up allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
score, pairs = mmcs(small, large, "max")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert abs(score - 1.0) < 1e-9 and len(pairs) == 4096, score
print(f"peak resident set grew by {(after - before) // 1024} MiB (full cosine matrix: 256 MiB)")
