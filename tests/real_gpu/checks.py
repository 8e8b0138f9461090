"""The gate's plan-time checks and the GPU smoke program, run with a GPU machine's own Python and torch
(called by tests/real_gpu/run.sh with the nvidia-smi query it captured). Prints what each gives."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tasks.host.gpu_checks import CudaEnv, gate_problems, parse_gpus, smoke_devices  # noqa: E402

gpus = parse_gpus(Path(sys.argv[1]).read_text().splitlines())
for gpu in gpus:
    print("parsed:", gpu)

runtime, source = None, None
for dist in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu11"):
    try:
        runtime, source = importlib.metadata.version(dist), f"{dist} dist-info"
        break
    except importlib.metadata.PackageNotFoundError:
        continue
requires = [line for line in (importlib.metadata.requires("torch") or []) if "cuda-runtime" in line]
print("torch", torch.__version__, "torch.version.cuda", torch.version.cuda, "| torch requires:", requires)
if runtime is None:
    runtime, source = torch.version.cuda, "torch.version.cuda (no nvidia-cuda-runtime distribution)"
print(f"CUDA runtime {runtime} from {source}")
flags = torch._C._cuda_getArchFlags()
print("torch._C._cuda_getArchFlags():", repr(flags), "| get_arch_list():", torch.cuda.get_arch_list())
hidden = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available(), "
                         "repr(torch._C._cuda_getArchFlags()))"], capture_output=True, text=True,
                        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
print("with no GPU visible (CUDA_VISIBLE_DEVICES=''): is_available, arch flags =", hidden.stdout.strip(),
      hidden.stderr.strip()[-300:])

lib = Path(torch.__file__).parent / "lib"
if flags:
    needle = flags.encode()
    for path in sorted(lib.glob("libtorch_cuda*.so*")):
        data = path.read_bytes()
        print(f"arch flags string in {path.name} ({len(data) / 1e6:.0f} MB): at offset {data.find(needle)}")

cuda = CudaEnv(runtime, tuple((flags or "").split()))
docker_gpus = ("runtime" if shutil.which("nvidia-container-runtime") or shutil.which("nvidia-container-runtime-hook")
               else "cdi" if any(Path(d).is_dir() and any(Path(d).iterdir()) for d in ("/etc/cdi", "/var/run/cdi"))
               else "")
print("docker GPU support seen from here:", docker_gpus or "none")
print("gate_problems(this host, this torch):", gate_problems(gpus, docker_gpus or "runtime", cuda) or "none")
print("gate_problems(this host, CUDA 13.0 env):", gate_problems(gpus, "runtime", CudaEnv("13.0.48")))
print("gate_problems(this host, torch built for sm_80 sm_86 only):",
      gate_problems(gpus, "runtime", CudaEnv(runtime, ("sm_80", "sm_86"))))
print("gate_problems(this host, no docker GPU support):", gate_problems(gpus, "", cuda))

expectation = smoke_devices(gpus)
started = time.monotonic()
smoke = subprocess.run([sys.executable, str(ROOT / "files/host/gpu_smoke.py"), expectation],
                       capture_output=True, text=True)
print(f"smoke test (expects {expectation} devices): exit {smoke.returncode} in {time.monotonic() - started:.1f}s")
print(smoke.stdout + smoke.stderr)
wrong = subprocess.run([sys.executable, str(ROOT / "files/host/gpu_smoke.py"), str(len(gpus) + 1)],
                       capture_output=True, text=True)
print(f"smoke test told to expect {len(gpus) + 1} devices: exit {wrong.returncode}: {wrong.stderr.strip()}")
