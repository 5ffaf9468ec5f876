"""`balora train` itself under accelerate's FSDP2 on this CPU (two gloo processes), or in one process; used
by test_fsdp.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cli.py CONFIG [--resume]
    python tests/fsdp_cli.py CONFIG

With more than one process, accelerate's state is configured as `accelerate launch --config_file
"$(balora launch-config fsdp2)"` sets it on GPUs, with the one switch accelerate withholds on CPUs
(fsdp_train.configure_fsdp2_on_cpu); the config asks the Trainer to use that state
(training.accelerator_config.use_configured_state). Everything else is the CLI as users run it.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from fsdp_train import configure_fsdp2_on_cpu

        configure_fsdp2_on_cpu()
    from balora.cli import main

    sys.exit(main(["train", *sys.argv[1:], "--no-progress"]))
