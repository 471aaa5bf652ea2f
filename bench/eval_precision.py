"""Does the precision of the evaluation change the metrics?

For every cached quality-benchmark model of one architecture (``bench.quality``
trains and caches them in ``bench/.cache``), CA, ASR and RA measured in fp32
and under each CPU mode of the engine (channels-last, bf16 autocast, both).
The engine trains in the fastest mode but reports fp32 metrics; this shows why.

    .venv/bin/python -m bench.eval_precision --arch preact_resnet18
"""

from __future__ import annotations

import argparse

import torch

from bench.common import CACHE_DIR, mnist_split
from bench.quality import ATTACKS, EXTRA_ATTACKS, attack_trigger, model_spec
from defense_core.attacks import TriggerSpec, make_poisoned_test_set
from defense_core.device import DeviceRuntime
from defense_core.loading import read_state_dict
from defense_core.metrics import evaluate
from defense_core.registry import create_model

CPU = torch.device("cpu")
MODES = {
    "fp32": DeviceRuntime(CPU),
    "channels_last": DeviceRuntime(CPU, channels_last=True),
    "bf16": DeviceRuntime(CPU, autocast_dtype=torch.bfloat16),
    "channels_last+bf16": DeviceRuntime(CPU, autocast_dtype=torch.bfloat16, channels_last=True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="preact_resnet18")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec, split = model_spec(args.arch), mnist_split()
    names = {name.lower(): name for name in [*ATTACKS, *EXTRA_ATTACKS]}
    paths = sorted(CACHE_DIR.glob(f"{args.arch}-*.safetensors"))
    if not paths:
        parser.error(f"no cached {args.arch} models in {CACHE_DIR}: run bench.quality first")
    print("| model | mode | CA | ASR | RA |\n|---|---|---:|---:|---:|")
    for path in paths:
        kind = path.name[len(args.arch) + 1:].rsplit("-", 1)[0]
        # the clean control's ASR uses the BadNets trigger, as in bench.quality
        trigger = TriggerSpec.from_dict(attack_trigger(names.get(kind, "clean")) or ATTACKS["BadNets"])
        poisoned = make_poisoned_test_set(split.test, trigger)
        for mode, runtime in MODES.items():
            model = create_model(spec)
            model.load_state_dict(read_state_dict(path))
            m = evaluate(runtime.prepare_model(model.eval()), spec, test=split.test, poisoned=poisoned, runtime=runtime)
            print(f"| {kind} | {mode} | {100 * m.ca:.1f} | {100 * m.asr:.2f} | {100 * m.ra:.2f} |", flush=True)


if __name__ == "__main__":
    main()
