"""The GPU smoke test: CUDA is available to torch, the device count is what the host reports, and a
matmul on each device gives the exact answer. Runs in the runtime image with the candidate env mounted
and the host's GPUs given, or directly with any Python that has torch.

usage: gpu_smoke.py DEVICES   (DEVICES: "N" exactly N devices, "N+" at least N)
Exit status 0 when every check passes, else 1 with the check that failed.
"""

import importlib.util
import sys
import time

SIZE = 1024

if importlib.util.find_spec("torch") is None:
    print("GPU smoke test: the container started with the GPUs given; the env has no torch, nothing more to run")
    sys.exit(0)
import torch  # noqa: E402

expected = sys.argv[1] if len(sys.argv) > 1 else "1+"
at_least = expected.endswith("+")
wanted = int(expected.rstrip("+"))
print("torch %s, CUDA runtime %s, arch list %s" % (torch.__version__, torch.version.cuda,
                                                   " ".join(torch.cuda.get_arch_list()) or "none"))
if torch.version.cuda is None:
    sys.exit("GPU smoke test: the env's torch %s is a CPU build, on a host with GPUs: deploy a CUDA env here "
             "(requirements.ml.txt)" % torch.__version__)
if not torch.cuda.is_available():
    sys.exit("GPU smoke test: torch.cuda.is_available() is False (torch %s, CUDA %s): the container sees no "
             "usable GPU" % (torch.__version__, torch.version.cuda))
count = torch.cuda.device_count()
if count < wanted or (count != wanted and not at_least):
    sys.exit("GPU smoke test: torch sees %d CUDA device(s), the host reports %s" % (count, expected))
torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the operands; the check wants exact sums
failed = []
for index in range(count):
    device = torch.device("cuda", index)
    name = torch.cuda.get_device_name(index)
    capability = "%d.%d" % torch.cuda.get_device_capability(index)
    started = time.monotonic()
    # Small integers in float32: every product and sum is exact, so the result is checked for equality.
    left = (torch.arange(SIZE * SIZE, device=device, dtype=torch.float32) % 7).reshape(SIZE, SIZE)
    right = (torch.arange(SIZE * SIZE, device=device, dtype=torch.float32) % 5).reshape(SIZE, SIZE).t()
    product = (left @ right).cpu()
    torch.cuda.synchronize(device)
    elapsed = time.monotonic() - started
    expected_product = left.cpu().double() @ right.cpu().double()
    wrong = int((product.double() != expected_product).sum())
    line = "GPU %d %s (compute capability %s): %dx%d matmul %s in %.3fs" % (
        index, name, capability, SIZE, SIZE, "exact" if not wrong else "WRONG in %d cells" % wrong, elapsed)
    print(line)
    if wrong:
        failed.append(line)
if failed:
    sys.exit("GPU smoke test failed:\n  " + "\n  ".join(failed))
print("GPU smoke test: %d device(s) passed" % count)
