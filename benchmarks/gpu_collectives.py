"""Issue 21, item 4, on a GPU: does XLA:GPU turn the FSDP gradient all-reduce + slice into reduce-scatters?

XLA:CPU forms no reduce-scatters (tests/test_pod_sharding.py shows the all-reduce-then-slice
pattern after partitioning). This compiles the same trainer step (a small Llama, scanned layers,
bf16 compute, fsdp=8) for 8 GPUs on ONE GPU, with jax's mock GPU topology (mock NCCL: compile
only, nothing runs), and counts the gradient collectives in the compiled program.

    python benchmarks/gpu_collectives.py --json=OUT.json        # on a machine with a CUDA GPU

Result: `compiled_reduce_scatters` > 0 and `compiled_matrix_all_reduces` close to 0 means the GPU
pipeline already reduce-scatters the gradients and nothing needs changing; otherwise the sharding
of the gradients must be made explicit (issue 21). Exits 3 when the mock topology gives fewer than
8 devices (an older or newer jax may spell the flag differently).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_MOCK_GPU_TOPOLOGY", "1x1x8")  # 1 slice x 1 host x 8 devices, before jax starts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_config(mesh=(1, 8, 1)):
    """The config the CPU test compiles (tests/test_pod_sharding.py), with the GPU's kernels."""
    from flan_jax import default_config

    config = default_config.get_config()
    config.model.update(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                        d_ff=128, max_positions=32, dtype="bfloat16", scan_layers=True)
    config.data.seq_len, config.data.batch_size = 32, 8
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    import jax

    from flan_jax.train import aot

    devices = jax.devices()
    print("backend", jax.default_backend(), "devices", len(devices), devices[:2], flush=True)
    if len(devices) < 8:
        print(f"the mock topology {os.environ['JAX_MOCK_GPU_TOPOLOGY']} gave {len(devices)} devices, 8 needed", flush=True)
        return 3
    report = aot.compile_train_step(step_config(), devices=devices[:8])
    row = {"backend": jax.default_backend(), "device": str(devices[0].device_kind), "compile_s": report.compile_s,
           **report.gradient_reductions(), "collectives_compiled": aot.count_collectives(report.optimized_hlo)}
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
