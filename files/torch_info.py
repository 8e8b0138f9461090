"""Print what the GPU gate needs of the env's torch as JSON: {} without torch, else its version, the CUDA
version it was built with (None for a CPU build) and its build arch list. Needs no GPU: the arch list is
compiled in (on a GPU machine with CUDA_VISIBLE_DEVICES="" it still reads sm_75 … sm_120)."""

import importlib.util
import json

if importlib.util.find_spec("torch") is None:
    print("{}")
else:
    import torch

    cuda = torch.version.cuda
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)() if cuda else None
    print(json.dumps({"version": torch.__version__, "cuda": cuda, "archs": (flags or "").split()}))
